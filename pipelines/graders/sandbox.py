"""Run a response's code against HumanEval-style tests behind a process boundary, and decide the verdict safely.

:func:`run_tests` starts ``python -I -S`` (no site-packages, no environment variables, no user paths) in a new
session, with a fresh temporary working directory, and hands it the job on stdin. The child side
(:mod:`pipelines.graders.sandbox_child`) splits into a *checker* process that runs the reference's tests and a
*candidate* process that runs the response's code; the tests reach the response's entry point through a stub that
forwards each call (arguments and return values pickled; the checker accepts only plain data back). So nothing the
response does can change the tests, ``check`` or the checker's builtins.

The verdict is a random per-run nonce that the checker writes to an inherited pipe only after ``check(candidate)``
returned. The candidate process never has the nonce or the pipe (it is a fresh ``execve`` with only its two message
pipes), so exiting early (``sys.exit(0)``, ``os._exit(0)``), killing its parent, redefining ``check``, patching
builtins or printing "passed" cannot produce it. Exit statuses and output decide nothing.

Enforced always: the wall timeout (the whole session killed), ``RLIMIT_CPU``/``AS``/``FSIZE``/``NOFILE``/``NPROC``,
an audit hook that refuses sockets before the response's code runs, an empty environment, the temp directory
removed afterwards. Enforced when the grader runs as root (this project's CI container): new mount and network
namespaces (no interface but a down loopback), fresh tmpfs over /tmp, /var/tmp and /dev/shm, the project, the
virtual environment, the project's parent directory and $HOME hidden under empty read-only mounts, and checker and candidate under two fresh random
uids, so the candidate cannot signal, ptrace or read the checker, ``RLIMIT_NPROC`` counts only its own processes,
and every process of both uids is killed at the end (a child that calls ``setsid`` or ignores SIGTERM included).
Without root, the namespaces and uid separation are skipped (``sandbox_mode()`` says which); the launcher still
reaps every descendant (it is a child subreaper), unless the candidate kills it first (same uid), after which a
child that left the session can outlive the run.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["TEMP_PREFIX", "SandboxLimits", "SandboxResult", "run_tests", "sandbox_mode"]

TEMP_PREFIX = "oprd-grade-"
"""Prefix of the sandbox's temporary working directories (tests count them)."""

_CHILD_SOURCE = (Path(__file__).with_name("sandbox_child.py")).read_text()
_PROJECT_ROOT = Path(__file__).resolve().parents[2]
_UID_RANGE = (1 << 20, 1 << 30)


@dataclass(frozen=True)
class SandboxLimits:
    """Per-run limits. ``wall_s`` bounds the whole run (seconds); ``cpu_s`` is RLIMIT_CPU of each process."""

    wall_s: float = 20.0
    cpu_s: int = 10
    memory_bytes: int = 1 << 30
    file_bytes: int = 16 << 20
    processes: int = 32
    open_files: int = 64

    def rlimits(self, isolated: bool) -> dict[str, int]:
        limits = {
            "RLIMIT_CPU": self.cpu_s,
            "RLIMIT_AS": self.memory_bytes,
            "RLIMIT_FSIZE": self.file_bytes,
            "RLIMIT_NOFILE": self.open_files,
            "RLIMIT_CORE": 0,
        }
        if (
            isolated
        ):  # per fresh uid; without uid separation NPROC would count every process of the grader's user
            limits["RLIMIT_NPROC"] = self.processes
        return limits


@dataclass(frozen=True)
class SandboxResult:
    passed: bool
    reason: str = ""
    wall_s: float = 0.0
    extra: dict = field(default_factory=dict)
    """``uids``: the fresh uids checker and candidate ran under (empty without isolation)."""


def sandbox_mode() -> str:
    """``"isolated"`` (root: namespaces + uid separation) or ``"rlimits"`` (limits, audit hook, session only)."""
    return "isolated" if os.geteuid() == 0 and sys.platform == "linux" else "rlimits"


def _interpreter() -> tuple[str, str]:
    """The base interpreter (not the venv's wrapper) and its prefix, both resolved."""
    python = os.path.realpath(getattr(sys, "_base_executable", sys.executable))
    return python, os.path.realpath(sys.base_prefix)


_SYSTEM_DIRS = {
    "/",
    "/usr",
    "/usr/local",
    "/usr/lib",
    "/lib",
    "/lib64",
    "/bin",
    "/sbin",
    "/etc",
    "/opt",
    "/var",
}


SCRATCH_DIRS = ("/tmp", "/var/tmp", "/dev/shm")
"""Replaced by fresh tmpfs in the sandbox (sandbox_child._isolate), which hides whatever lived under them."""


def _under_scratch(path: str) -> bool:
    return any(path == d or path.startswith(d + "/") for d in SCRATCH_DIRS)


def _hidden_paths() -> list[str]:
    """What the candidate must not see: the project and its sibling checkouts (its parent directory), the virtual
    environment and the project it belongs to (the venv's parent), the user's home. Never a system directory or the
    interpreter's prefix (which the launcher bind-mounts elsewhere before hiding anything), and never a scratch dir
    or a path under one: the fresh tmpfs already hides those, and hiding ``/tmp`` itself (a checkout in
    ``/tmp/<clone>`` has it as its parent) would cover the interpreter's mount at ``/tmp/.python``."""
    paths = {str(_PROJECT_ROOT), str(_PROJECT_ROOT.parent), os.path.expanduser("~")}
    if sys.prefix != sys.base_prefix:
        venv = os.path.realpath(sys.prefix)
        paths |= {venv, os.path.dirname(venv)}
    _python, base = _interpreter()
    return sorted(
        p
        for p in paths
        if p and p not in _SYSTEM_DIRS and p != base and not _under_scratch(p) and os.path.isdir(p)
    )


def _processes_of(uids: set[int]) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status") as f:
                for line in f:
                    if line.startswith("Uid:"):
                        if int(line.split()[1]) in uids:
                            found.append(int(entry))
                        break
        except (OSError, ValueError):
            continue
    return found


def _kill_uids(uids: set[int]) -> None:
    """SIGKILL every process whose real uid is in ``uids`` until none is left (forks race the first sweeps)."""
    for _ in range(100):
        pids = _processes_of(uids)
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.01)


def run_tests(
    code: str, tests: str, entry_point: str, prompt: str = "", limits: SandboxLimits | None = None
) -> SandboxResult:
    """Run ``check(<entry_point of code>)`` from ``tests`` in the sandbox; passed only when ``check`` returned."""
    limits = limits or SandboxLimits()
    isolated = sandbox_mode() == "isolated"
    python, prefix = _interpreter()
    nonce = secrets.token_hex(32).encode()
    uids = (
        (secrets.randbelow(_UID_RANGE[1] - _UID_RANGE[0]) + _UID_RANGE[0] for _ in range(2))
        if isolated
        else iter((None, None))
    )
    checker_uid, candidate_uid = next(uids), next(uids)
    workdir = tempfile.mkdtemp(prefix=TEMP_PREFIX)
    nonce_r, nonce_w = os.pipe()
    result_r, result_w = os.pipe()
    proc = None
    start = time.monotonic()
    ids = {"uids": [u for u in (checker_uid, candidate_uid) if u is not None]}
    try:
        os.write(nonce_w, nonce)
        os.close(nonce_w)
        if isolated:
            os.chown(workdir, candidate_uid, candidate_uid)
        job = {
            "source": _CHILD_SOURCE,
            "code": code,
            "tests": tests,
            "prompt": prompt,
            "entry_point": entry_point,
            "python": python,
            "python_prefix": prefix,
            "isolate": isolated,
            "hidden": _hidden_paths() if isolated else [],
            "rlimits": limits.rlimits(isolated),
            "checker_uid": checker_uid,
            "candidate_uid": candidate_uid,
            "nonce_fd": nonce_r,
            "wall_s": limits.wall_s,
            "result_fd": result_w,
        }
        proc = subprocess.Popen(
            [python, "-I", "-S", "-c", _CHILD_SOURCE],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            cwd=workdir,
            env={},
            start_new_session=True,
            pass_fds=(nonce_r, result_w),
        )
        os.close(nonce_r)
        os.close(result_w)
        nonce_r = result_w = -1
        try:  # the launcher enforces wall_s itself (and cleans up); this is the backstop
            _, stderr = proc.communicate(json.dumps(job).encode(), timeout=limits.wall_s + 10)
        except subprocess.TimeoutExpired:
            reason = (
                f"timed out after {limits.wall_s:g} s and the launcher did not stop it (killed by the grader)"
            )
            return SandboxResult(False, reason, time.monotonic() - start, ids)
        if proc.returncode == 124:
            return SandboxResult(False, f"timed out after {limits.wall_s:g} s", time.monotonic() - start, ids)
        os.set_blocking(result_r, False)
        try:
            written = os.read(result_r, 256)
        except BlockingIOError:
            written = b""
        elapsed = time.monotonic() - start
        if written and secrets.compare_digest(written, nonce):
            return SandboxResult(True, "", elapsed, ids)
        reason = stderr.decode("utf-8", "replace").strip().splitlines()
        if reason:
            return SandboxResult(False, reason[-1][:500], elapsed, ids)
        code_ = proc.returncode
        if code_ is not None and code_ < 0:
            name = signal.Signals(-code_).name if -code_ in signal.valid_signals() else str(-code_)
            extra = " (CPU time limit)" if -code_ == signal.SIGXCPU else ""
            return SandboxResult(False, f"the checker was killed by {name}{extra}", elapsed, ids)
        return SandboxResult(False, f"the tests did not complete (exit status {code_})", elapsed, ids)
    finally:
        if proc is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            if proc.stdin:
                proc.stdin.close()
            if proc.stderr:
                proc.stderr.close()
        if isolated:
            _kill_uids({checker_uid, candidate_uid})
        for fd in (nonce_r, result_w, result_r):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        shutil.rmtree(workdir, ignore_errors=True)
