"""Exactly-once mutations: run a unit of work in one transaction, optionally keyed by ``Idempotency-Key``.

The stored outcome (status + JSON body) of a successful request is written in the same transaction as its
effects, so a retry with the same key and the same request replays it (``Idempotent-Replayed: true``) and
changes nothing; the same key with a different request (method, path, query string or body) is refused with
422. Concurrent requests with one
key serialise on the model lock (PostgreSQL) or the write lock (SQLite), so the second one sees the first's
record instead of doing the work twice. Failed requests store nothing: they changed nothing.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from urllib.parse import urlencode

from fastapi import Request
from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy.orm import Session

from server.auth import Principal
from server.errors import Invalid
from server.orm import IdempotencyRecord, enqueued
from server.registry import lock_model

_KEY = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def request_fingerprint(request: Request) -> str:
    """sha256 over method, path, the query parameters (order-insensitive) and the raw body."""
    body: bytes = request.scope.get("oprd.body", b"")
    query = urlencode(sorted(request.query_params.multi_items()))
    return hashlib.sha256(f"{request.method} {request.url.path}?{query}\n".encode() + body).hexdigest()


def _key(request: Request) -> str | None:
    key = request.headers.get("idempotency-key")
    if key is not None and not _KEY.match(key):
        raise Invalid("Idempotency-Key: 1-128 characters from [A-Za-z0-9._:-]")
    return key


def has_record(s: Session, request: Request, who: Principal) -> bool:
    """Whether this request's Idempotency-Key already has a stored outcome (``run_mutation`` then replays it, or
    refuses the reuse of the key); raises Invalid on a malformed key, as ``run_mutation`` would."""
    key = _key(request)
    return key is not None and s.get(IdempotencyRecord, (key, who.name)) is not None


def run_mutation(
    request: Request,
    who: Principal,
    model_name: str | None,
    work: Callable[[Session], BaseModel],
    status_code: int = 200,
) -> JSONResponse:
    """Run ``work(session)`` in a retried write transaction with idempotency-key handling; after commit, wait
    up to ``sync_wait_s`` for the reconciler to mirror *this request's* outbox rows to MLflow (never other
    requests' rows). If they are not applied by then the answer says so with ``OPRD-MLflow: pending``; the body
    is the same either way (it describes the database, which is the source of truth)."""
    state = request.app.state
    key = _key(request)
    fingerprint = request_fingerprint(request)

    def tx(s: Session) -> tuple[int, dict, bool, list[int]]:
        if model_name is not None:
            # Lock first, then look for the key: a concurrent duplicate waits here and then replays.
            lock_model(s, model_name)  # the work's own get_model(lock=True) reuses this row and lock
        if key is not None:
            rec = s.get(IdempotencyRecord, (key, who.name))
            if rec is not None:
                if rec.request_sha256 != fingerprint:
                    raise Invalid("Idempotency-Key: already used with a different request")
                return rec.status_code, rec.response, True, []
        body = jsonable_encoder(work(s))
        if key is not None:
            s.add(
                IdempotencyRecord(
                    key=key,
                    actor=who.name,
                    request_sha256=fingerprint,
                    status_code=status_code,
                    response=body,
                )
            )
        s.flush()
        return status_code, body, False, [item.id for item in enqueued(s)]

    code, body, replayed, outbox_ids = state.db.transact(tx)
    headers = {"Idempotent-Replayed": "true"} if replayed else {}
    if outbox_ids:
        mirrored = state.reconciler.wait_mirrored(outbox_ids, state.settings.sync_wait_s)
        if mirrored != "applied":
            headers["OPRD-MLflow"] = mirrored  # "pending" (applied later) or "parked" (MLflow refused it)
    return JSONResponse(body, status_code=code, headers=headers)
