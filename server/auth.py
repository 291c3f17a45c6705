"""Bearer-token authentication and the fail-closed, route-table-driven authorization.

Tokens are stored as sha256 hex digests only. Every route of the app must appear in ``ACCESS_RULES``
(``tests/server/test_server_auth.py`` builds the check from the route table): a route without a rule is
refused with 403 at run time rather than left open (the MLflow PR#23319 lesson, reliability.md §1a).
"""

from __future__ import annotations

import hashlib
import secrets
import threading
import time
from dataclasses import dataclass
from typing import Annotated, Literal

from fastapi import Depends, HTTPException, Request, status
from fastapi.concurrency import run_in_threadpool
from sqlalchemy import select
from sqlalchemy.orm import Session

from server.orm import ApiToken

Role = Literal["read", "ci", "admin"]
ROLE_RANK: dict[str, int] = {"read": 0, "ci": 1, "admin": 2}
PUBLIC = "public"

# route name -> minimum role ("public" = no token). Mutating routes need at least "ci".
ACCESS_RULES: dict[str, str] = {
    "health": PUBLIC,
    "list_models": "read",
    "list_versions": "read",
    "get_version": "read",
    "register_version": "ci",
    "submit_evidence": "ci",
    "gate": "ci",
    "get_decision": "read",
    "model_status": "read",
    "model_history": "read",
    "model_cost_history": "read",
    "model_lineage": "read",
    "promote": "ci",
    "rollback": "ci",
    "retire_version": "admin",
    "retire_teacher": "admin",
    "get_policy": "read",
    "set_policy": "admin",
    "reconcile": "admin",
    "list_outbox": "admin",
    "retry_outbox": "admin",
    "drop_outbox": "admin",
    "create_token": "admin",
    "list_events": "read",
    "add_webhook": "admin",
    "list_webhooks": "admin",
    "remove_webhook": "admin",
    "redeliver_webhook": "admin",
    "retire_by_policy": "admin",
    "submit_trigger": "ci",
    "list_triggers": "read",
    "claim_trigger": "ci",
    "set_trigger_state": "ci",
    # only registered when OPRD_PUBLIC_DOCS is off (the default with tokens configured)
    "openapi": "read",
    "docs": "read",
    "redoc": "read",
}


@dataclass(frozen=True)
class Principal:
    name: str
    role: str

    def at_least(self, role: str) -> bool:
        return ROLE_RANK[self.role] >= ROLE_RANK[role]


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    return "oprd_" + secrets.token_urlsafe(32)


def ensure_token(session: Session, *, name: str, role: str, secret: str) -> None:
    """Create or update the token ``name`` so that ``secret`` authenticates with ``role``."""
    if role not in ROLE_RANK:
        raise ValueError(f"token {name!r}: role must be one of {sorted(ROLE_RANK)}, got {role!r}")
    row = session.scalar(select(ApiToken).where(ApiToken.name == name))
    if row is None:
        session.add(ApiToken(name=name, role=role, token_sha256=hash_token(secret)))
    else:
        row.role, row.token_sha256, row.revoked = role, hash_token(secret), False


def parse_token_list(raw: str) -> list[tuple[str, str, str]]:
    """``name:role:secret,...`` -> [(name, role, secret)]; raises ValueError on a malformed entry."""
    out = []
    for entry in filter(None, (e.strip() for e in raw.split(","))):
        parts = entry.split(":", 2)
        if len(parts) != 3 or not all(parts):
            raise ValueError("OPRD_TOKENS entries must look like name:role:secret")
        out.append((parts[0], parts[1], parts[2]))
    return out


def _unauthorized(msg: str) -> HTTPException:
    return HTTPException(
        status.HTTP_401_UNAUTHORIZED, detail=f"authorization: {msg}", headers={"WWW-Authenticate": "Bearer"}
    )


async def authorize(request: Request) -> Principal:
    """Router-level dependency: authenticate the caller and check the route's rule from ``ACCESS_RULES``.

    Async so that public routes (``/health``) and cached tokens need no worker thread; only a token-cache miss
    reads the database, on the thread pool.
    """
    route = request.scope.get("route")
    rule = ACCESS_RULES.get(getattr(route, "name", ""))
    if rule is None:
        raise HTTPException(
            status.HTTP_403_FORBIDDEN, detail="authorization: route has no access rule (fail closed)"
        )
    if rule == PUBLIC:
        return Principal(name="anonymous", role="read")
    header = request.headers.get("authorization")
    state = request.app.state
    if header is None and state.local_actor is not None:
        # In-process CLI mode: the local user acts as admin on their own database.
        principal = Principal(name=f"local:{state.local_actor}", role="admin")
    else:
        cached = _cached(header, state.token_cache)
        principal = cached or await run_in_threadpool(_authenticate, header, state.db.read, state.token_cache)
    if not principal.at_least(rule):
        raise HTTPException(
            status.HTTP_403_FORBIDDEN, detail=f"authorization: role {principal.role!r} lacks {rule!r}"
        )
    return principal


def _cached(header: str | None, cache: TokenCache) -> Principal | None:
    """The principal of a well-formed header whose token is cached as valid, else None (decide the slow way)."""
    scheme, _, token = (header or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return cache.peek(hash_token(token.strip()))


class TokenCache:
    """sha256 -> Principal (or None for unknown/revoked) for ``ttl_s`` seconds: one DB read per token per TTL
    instead of one per request. Tokens created or rotated through this process are dropped from it at once;
    other processes see a change within ``ttl_s``."""

    def __init__(self, ttl_s: float) -> None:
        self.ttl_s = ttl_s
        self._entries: dict[str, tuple[float, Principal | None]] = {}
        self._mutex = threading.Lock()

    def lookup(self, digest: str, session_factory) -> Principal | None:  # type: ignore[no-untyped-def]
        now = time.monotonic()
        with self._mutex:
            hit = self._entries.get(digest)
        if hit is not None and hit[0] > now:
            return hit[1]
        with session_factory() as session:
            row = session.scalar(select(ApiToken).where(ApiToken.token_sha256 == digest))
        principal = None if row is None or row.revoked else Principal(name=row.name, role=row.role)
        if self.ttl_s > 0:
            with self._mutex:
                if len(self._entries) > 10_000:  # unknown tokens must not grow it without bound
                    self._entries.clear()
                self._entries[digest] = (now + self.ttl_s, principal)
        return principal

    def peek(self, digest: str) -> Principal | None:
        """A cached, unexpired, valid principal; None on a miss (or a cached refusal: re-checked the slow way)."""
        with self._mutex:
            hit = self._entries.get(digest)
        return hit[1] if hit is not None and hit[0] > time.monotonic() else None

    def clear(self) -> None:
        with self._mutex:
            self._entries.clear()


def _authenticate(header: str | None, session_factory, cache: TokenCache) -> Principal:  # type: ignore[no-untyped-def]
    if not header:
        raise _unauthorized("missing bearer token")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise _unauthorized("malformed Authorization header (expected 'Bearer <token>')")
    principal = cache.lookup(hash_token(token.strip()), session_factory)
    if principal is None:
        raise _unauthorized("unknown or revoked token")
    return principal


CurrentPrincipal = Annotated[Principal, Depends(authorize)]
