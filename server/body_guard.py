"""ASGI middleware that vets request bodies before FastAPI parses them.

- larger than ``max_body_bytes`` (declared or streamed) -> 413
- a body on POST/PUT/PATCH that is not ``application/json`` -> 415
- JSON with duplicate keys -> 422 (``json`` would silently keep the last one; an attacker could hide a field)
- what Python's ``json`` accepts but JSON does not -> 422 naming the field: ``NaN``/``Infinity`` (they would be
  stored, then fail to encode in the response after the commit) and nesting deeper than ``MAX_DEPTH``
  (a ``RecursionError`` in the parser or later in pydantic)
- a string (value or key) holding a lone UTF-16 surrogate (``"\\ud800"`` is a valid JSON escape but not Unicode
  text) -> 422 naming the field: it could not be encoded as UTF-8 in a response, a log line or the database, so
  a 422 that echoes it (FastAPI's validation errors do) or a stored row holding it would turn into a 500
The raw body is kept in ``scope["oprd.body"]`` for the idempotency fingerprint.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

_BODY_METHODS = {"POST", "PUT", "PATCH"}
MAX_DEPTH = 32
"""Deepest nesting of arrays/objects any request needs (the evidence file is about 6 levels deep)."""


class _NonFinite:
    def __init__(self, text: str) -> None:
        self.text = text


def _non_finite(text: str) -> _NonFinite:
    return _NonFinite(text)


def has_lone_surrogate(text: str) -> bool:
    """True when ``text`` cannot be encoded as UTF-8 (it holds a code point in U+D800..U+DFFF)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def printable(text: str) -> str:
    """``text`` with lone surrogates written as ``\\udXXX`` escapes, so it can always be encoded."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _find_problem(value: Any, path: str, depth: int) -> str | None:
    """The first non-JSON part of a parsed body as ``"<path>: <why>"``, or None. Iterative in spirit: the
    depth is checked before recursing, so this never recurses deeper than ``MAX_DEPTH``."""
    if isinstance(value, _NonFinite):
        return f"{path or 'body'}: {value.text} is not a JSON number"
    if isinstance(value, str) and has_lone_surrogate(value):
        return f"{printable(path) or 'body'}: contains a lone UTF-16 surrogate (not valid Unicode text)"
    if isinstance(value, dict | list):
        if depth >= MAX_DEPTH:
            return f"{path or 'body'}: nested deeper than {MAX_DEPTH} levels"
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for k, v in items:
            if isinstance(k, str) and has_lone_surrogate(k):
                return f"{printable(path) or 'body'}: a key contains a lone UTF-16 surrogate (not valid Unicode text)"
            sub = (
                f"{path}.{k}"
                if isinstance(value, dict) and path
                else (str(k) if isinstance(value, dict) else f"{path}[{k}]")
            )
            found = _find_problem(v, sub, depth + 1)
            if found:
                return found
    return None


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate JSON key {k!r}")
        out[k] = v
    return out


class BodyGuard:
    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app, self.max = app, max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in _BODY_METHODS:
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        declared = headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max):
            await _error(
                send, 413, "body: larger than the limit" if declared.isdigit() else "content-length: invalid"
            )
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max:
                await _error(send, 413, f"body: larger than {self.max} bytes")
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        if body:
            ctype = headers.get("content-type", "").split(";")[0].strip().lower()
            if ctype != "application/json":
                await _error(send, 415, "content-type: must be application/json")
                return
            try:
                parsed = json.loads(body, object_pairs_hook=_reject_duplicates, parse_constant=_non_finite)
            except RecursionError:
                await _error(send, 422, f"body: nested deeper than {MAX_DEPTH} levels")
                return
            except ValueError as exc:
                await _error(send, 422, f"body: {exc}")
                return
            problem = _find_problem(parsed, "", 0)
            if problem is not None:
                await _error(send, 422, problem)
                return
        scope["oprd.body"] = body
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if sent:
                return await receive()
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


async def _error(send: Send, status: int, detail: str) -> None:
    payload = json.dumps({"detail": detail}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})
