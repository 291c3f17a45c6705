"""A real HTTP webhook receiver for the event tests: a ThreadingHTTPServer on loopback that verifies signatures,
de-duplicates on ``webhook-id`` (the receiver half of at-least-once delivery), and can fail or hold requests."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from server.webhooks import verify_signature


@dataclass
class Attempt:
    id: str
    type: str
    valid_signature: bool
    answered: int | None
    """The status this receiver answered, None when the request was held and the sender went away."""
    envelope: dict[str, Any]


@dataclass
class Receiver:
    """``plan(envelope, attempt_index_for_this_id) -> action``: ``"ok"`` (process, 200), ``"fail"`` (503),
    ``"hold"`` (do not process; wait for ``release``, then 503), ``"process-then-hold"`` (process, then wait for
    ``release`` before answering 200: the sender may die before it sees the 200)."""

    secret: str = ""
    plan: Callable[[dict[str, Any], int], str] = lambda env, i: "ok"
    attempts: list[Attempt] = field(default_factory=list)
    processed: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Event id -> envelope, once per id: what the receiver's side effects ran on."""
    duplicates: list[str] = field(default_factory=list)
    """Ids that arrived again after being processed (de-duplicated, answered 200)."""
    held: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                headers = {k.lower(): v for k, v in self.headers.items()}
                envelope = json.loads(body)
                ok_sig = verify_signature(receiver.secret, headers, body)
                with receiver.lock:
                    n = sum(a.id == headers.get("webhook-id") for a in receiver.attempts)
                    action = receiver.plan(envelope, n) if ok_sig else "fail"
                    attempt = Attempt(headers.get("webhook-id", ""), envelope["type"], ok_sig, None, envelope)
                    receiver.attempts.append(attempt)
                    if action in ("ok", "process-then-hold"):
                        if attempt.id in receiver.processed:
                            receiver.duplicates.append(attempt.id)
                        else:
                            receiver.processed[attempt.id] = envelope
                if action in ("hold", "process-then-hold"):
                    receiver.held.set()
                    receiver.release.wait(60)
                code = 200 if action in ("ok", "process-then-hold") else 503
                try:
                    self.send_response(code)
                    self.send_header("content-length", "0")
                    self.end_headers()
                    attempt.answered = code
                except OSError:  # the sender is gone (killed): it never saw this answer
                    pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait_processed(self, n: int, timeout_s: float = 30.0) -> None:
        """Until ``n`` distinct events were processed (generous bound: proves "does not hang", not speed)."""
        deadline = time.monotonic() + timeout_s
        while len(self.processed) < n:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{len(self.processed)} of {n} events processed; attempts: {self.attempts}"
                )
            time.sleep(0.05)

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()
