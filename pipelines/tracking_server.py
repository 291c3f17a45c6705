"""A local lean MLflow tracking server as a subprocess (tests, demos, a laptop ``dvc repro`` with the UI).

Lean means ``MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false`` and ``--workers 1``: 2 processes and ~0.4 GB instead
of 15 processes and ~2 GB (stack-notes §4), which matters on small shared machines.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

__all__ = ["LeanMlflowServer", "free_port"]


def free_port() -> int:
    """A loopback TCP port that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LeanMlflowServer:
    """``mlflow server`` on ``127.0.0.1:<port>`` over ``<root>/mlflow.db`` with artifacts in ``<root>/artifacts``.

    :meth:`start` returns once ``/health`` answers 200 (raises ``RuntimeError`` with the log tail if the process
    dies or ``ready_timeout_s`` passes); :meth:`stop` ends the server's whole process group. Start and stop may
    be repeated: the port and the database stay the same, which is how outages are simulated.
    """

    def __init__(self, root: str | Path, *, port: int | None = None, ready_timeout_s: float = 90.0) -> None:
        self.root = Path(root).resolve()
        self.port = port or free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.ready_timeout_s = ready_timeout_s
        self.log_path = self.root / "mlflow-server.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> LeanMlflowServer:
        self.root.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        cmd = [
            sys.executable, "-m", "mlflow", "server",
            "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
            "--artifacts-destination", str(self.root / "artifacts"),
            "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
        ]  # fmt: skip
        with self.log_path.open("ab") as log:
            # Own session: stop() can end the uvicorn worker with its parent, and only them.
            self.proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited early:\n{self.log_path.read_text()[-3000:]}")
            try:
                if httpx.get(self.uri + "/health", timeout=1.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"mlflow server at {self.uri} not healthy after {self.ready_timeout_s:.0f}s")

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.proc = None

    def __enter__(self) -> LeanMlflowServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
