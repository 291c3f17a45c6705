"""The sandbox's child side: run by ``python -I -S`` from :mod:`pipelines.graders.sandbox`, never imported.

Three roles, one file (the source is re-executed with ``-c`` so that nothing has to be read from the project
after it is hidden):

``launch`` (started by the grader, as the grader's user; it never runs response code)
    Reads the job (JSON on stdin), makes itself a child subreaper, and, when it runs as root: enters new mount and
    network namespaces, mounts fresh tmpfs over /tmp, /var/tmp, /dev/shm and over every hidden path (the project,
    the virtual environment, the project's parent, $HOME), and bind-mounts the interpreter's prefix read-only at /tmp/.python.
    It sets the resource limits, forks the **candidate** and the **checker**, waits for the checker at most
    ``wall_s`` seconds (exit status 124 when it did not finish), then kills every descendant (orphans are
    re-parented to it) and every process of the two sandbox uids, and reaps them all before it exits.
``candidate`` (uid ``candidate_uid`` when root)
    A fresh interpreter (``execve``: it inherits no memory of the launcher) with only two pipe ends and /dev/null
    as stdio. An audit hook refuses sockets before any response code runs. It receives the response's code,
    executes it, and then answers calls of the entry point: arguments in, return value out (pickled; the
    checker unpickles only plain data).
``check`` (uid ``checker_uid`` when root; not dumpable, so /proc/<pid>/mem and ptrace are closed to the candidate)
    A fresh interpreter that executes the reference's prompt and tests, calls ``check(candidate)`` with a stub that
    forwards each call to the candidate process, and only when ``check`` returns writes the per-run nonce (read
    from an inherited pipe that the candidate never had) to the result pipe. Its stderr carries the reason.
"""

import contextlib
import os
import sys

FRAME = 8  # bytes of the big-endian length prefix of every message between checker and candidate
MAX_MESSAGE = 64 << 20


def _send(fd, payload):
    data = len(payload).to_bytes(FRAME, "big") + payload
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _read_exact(fd, n):
    chunks = []
    while n:
        chunk = os.read(fd, min(n, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def _recv(fd):
    head = _read_exact(fd, FRAME)
    if head is None:
        return None
    size = int.from_bytes(head, "big")
    if size > MAX_MESSAGE:
        raise OverflowError(f"message of {size} bytes")
    return _read_exact(fd, size)


# ------------------------------------------------------------------------------------------------ candidate


def candidate_main(to_me, from_me):
    import pickle

    def audit(event, args):
        if event.startswith("socket."):
            raise PermissionError(f"network access is not allowed in the grading sandbox ({event})")

    sys.addaudithook(audit)
    code, entry_point = pickle.loads(_recv(to_me))
    namespace = {"__name__": "__candidate__", "__builtins__": __builtins__}
    try:
        exec(compile(code, "<response>", "exec"), namespace)
        function = namespace[entry_point]
        if not callable(function):
            raise TypeError(f"{entry_point!r} is not callable")
    except KeyError:
        _send(from_me, pickle.dumps(("error", f"the response does not define {entry_point!r}")))
        return
    except BaseException as exc:
        _send(from_me, pickle.dumps(("error", f"{type(exc).__name__}: {str(exc)[:300]}")))
        return
    _send(from_me, pickle.dumps(("ready",)))
    while True:
        message = _recv(to_me)
        if message is None:
            return
        args, kwargs = pickle.loads(message)
        try:
            reply = ("ok", function(*args, **kwargs))
        except BaseException as exc:
            reply = ("raise", type(exc).__name__, str(exc)[:300])
        try:
            payload = pickle.dumps(reply, protocol=4)
        except BaseException as exc:
            payload = pickle.dumps(("bad_return", f"{type(exc).__name__}: {str(exc)[:200]}"))
        _send(from_me, payload)


# ------------------------------------------------------------------------------------------------ checker


def check_main(job_fd, nonce_fd, result_fd, to_candidate, from_candidate):
    import builtins
    import ctypes
    import io
    import json
    import pickle
    import traceback

    ctypes.CDLL(None).prctl(
        4, 0, 0, 0, 0
    )  # PR_SET_DUMPABLE=0: the candidate cannot ptrace or read our memory
    with os.fdopen(job_fd, "rb") as f:
        job = json.loads(f.read())
    nonce = os.read(nonce_fd, 256)
    os.close(nonce_fd)

    def fail(reason):
        sys.stderr.write(reason.replace("\n", " ")[:1000] + "\n")
        sys.stderr.flush()
        os._exit(1)

    plain = {"complex", "set", "frozenset", "bytearray", "range", "slice"}

    class PlainUnpickler(pickle.Unpickler):
        def find_class(self, module, name):
            if module == "builtins" and name in plain:
                return getattr(builtins, name)
            raise pickle.UnpicklingError(f"{module}.{name}")

    def receive():
        try:
            message = _recv(from_candidate)
        except OverflowError as exc:
            fail(f"the candidate sent too much data ({exc})")
        if message is None:
            raise CandidateDied("the candidate process exited before the tests completed")
        try:
            return PlainUnpickler(io.BytesIO(message)).load()
        except pickle.UnpicklingError as exc:
            raise CandidateDied(f"the candidate returned an object that is not plain data ({exc})") from None

    class CandidateDied(Exception):
        pass

    _send(to_candidate, pickle.dumps((job["code"], job["entry_point"])))
    status = receive()
    if status[0] == "error":
        fail(f"the response's code does not run: {status[1]}")

    def candidate(*args, **kwargs):
        try:
            payload = pickle.dumps((args, kwargs), protocol=4)
        except Exception as exc:
            raise CandidateDied(
                f"the tests pass an argument that cannot reach the candidate ({exc})"
            ) from None
        try:
            _send(to_candidate, payload)
        except OSError:
            raise CandidateDied("the candidate process exited before the tests completed") from None
        reply = receive()
        if reply[0] == "ok":
            return reply[1]
        if reply[0] == "bad_return":
            raise CandidateDied(f"the candidate returned a value that cannot be sent back ({reply[1]})")
        exc_type = getattr(builtins, reply[1], None)
        if not (isinstance(exc_type, type) and issubclass(exc_type, Exception)):
            exc_type = RuntimeError
        raise exc_type(f"candidate raised {reply[1]}: {reply[2]}")

    tests = job["tests"]
    namespace = {"__name__": "__tests__"}
    try:
        if job.get("prompt"):
            exec(compile(job["prompt"], "<prompt>", "exec"), namespace)
        namespace[job["entry_point"]] = candidate  # tests may call the entry point by name (HumanEval/33)
        exec(compile(tests, "<tests>", "exec"), namespace)
        check = namespace["check"]
        check(candidate)
    except BaseException as exc:
        frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename == "<tests>"]
        where = ""
        if frames:
            lines = tests.splitlines()
            lineno = frames[-1].lineno or 0
            source = lines[lineno - 1].strip() if 0 < lineno <= len(lines) else ""
            where = f" at tests line {lineno}: {source[:160]}"
        if isinstance(exc, CandidateDied):
            fail(f"{exc}{where}")
        message = str(exc)[:300]
        fail(f"{type(exc).__name__}{where}" + (f" ({message})" if message else ""))
    os.write(result_fd, nonce)
    os._exit(0)


# ------------------------------------------------------------------------------------------------ launcher


def _limits(job, resource):
    """Set every limit of ``job["rlimits"]`` (soft = hard) on this process; children inherit them."""
    for name, value in job["rlimits"].items():
        kind = getattr(resource, name)
        resource.setrlimit(kind, (value, value))


def _isolate(job, libc):
    """New mount + network namespaces; fresh tmpfs on scratch dirs and hidden paths; interpreter at /tmp/.python."""
    import ctypes

    CLONE_NEWNS, CLONE_NEWNET = 0x00020000, 0x40000000
    MS_RDONLY, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 32, 4096, 16384, 1 << 18

    def check(rc, what):
        if rc != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"{what}: {os.strerror(errno)}")

    check(libc.unshare(CLONE_NEWNS | CLONE_NEWNET), "unshare")
    check(libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None), "make / private")
    for path in ("/tmp", "/var/tmp", "/dev/shm"):
        if os.path.isdir(path):
            check(libc.mount(b"tmpfs", path.encode(), b"tmpfs", 0, b"size=64m,mode=1777"), f"tmpfs on {path}")
    target = b"/tmp/.python"
    os.mkdir(target, 0o755)
    check(
        libc.mount(job["python_prefix"].encode(), target, None, MS_BIND | MS_REC, None),
        "bind the interpreter",
    )
    check(libc.mount(b"none", target, None, MS_BIND | MS_REMOUNT | MS_RDONLY, None), "read-only interpreter")
    for path in job["hidden"]:
        if os.path.isdir(path):
            check(
                libc.mount(b"tmpfs", path.encode(), b"tmpfs", MS_RDONLY, b"size=4k,mode=0555"), f"hide {path}"
            )
    return "/tmp/.python" + job["python"][len(job["python_prefix"]) :]


def _become(uid):
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)


def _children(me):
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    stat = f.read()
                if int(stat[stat.rindex(b")") + 2 :].split()[1]) == me:
                    found.append(int(entry))
            except (OSError, ValueError):
                pass
    return found


def _owned_by(uids):
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.stat(f"/proc/{entry}").st_uid in uids:
                    found.append(int(entry))
            except OSError:
                pass
    return found


def _clean_up(uids):
    """Kill and reap every descendant: orphans are re-parented to us (we are a child subreaper)."""
    me = os.getpid()
    while True:
        for pid in _children(me) + (_owned_by(uids) if uids else []):
            with contextlib.suppress(OSError):  # SIGKILL: the signal module is not importable once isolated
                os.kill(pid, 9)
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            return


def launch():
    """Fork the candidate and the checker, wait for the checker (bounded by ``wall_s``), then kill and reap all."""
    import ctypes
    import json
    import resource  # imported before _isolate hides the interpreter's original prefix
    import select

    # everything this process imports must be imported here: _isolate hides the interpreter's original prefix
    job = json.loads(sys.stdin.buffer.read())
    source = job.pop("source")
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER: orphans (setsid or not) become our children
    python = job["python"]
    if job["isolate"]:
        python = _isolate(job, libc)
    _limits(job, resource)
    to_candidate = os.pipe()
    from_candidate = os.pipe()
    null = os.open(os.devnull, os.O_RDWR)
    candidate = os.fork()
    if candidate == 0:  # the candidate: keep two pipe ends, /dev/null as stdio, nothing else
        try:
            keep_r, keep_w = to_candidate[0], from_candidate[1]
            for fd in (0, 1, 2):
                os.dup2(null, fd)
            for fd in range(3, 1024):
                if fd not in (keep_r, keep_w):
                    with contextlib.suppress(OSError):
                        os.close(fd)
            os.set_inheritable(keep_r, True)
            os.set_inheritable(keep_w, True)
            if job["candidate_uid"] is not None:
                _become(job["candidate_uid"])
            os.execve(python, [python, "-I", "-S", "-c", source, "candidate", str(keep_r), str(keep_w)], {})
        finally:
            os._exit(127)
    os.close(to_candidate[0])
    os.close(from_candidate[1])
    job_fd = os.memfd_create("job", 0)
    os.write(job_fd, json.dumps({k: job[k] for k in ("code", "entry_point", "tests", "prompt")}).encode())
    os.lseek(job_fd, 0, 0)
    fds = [job_fd, job["nonce_fd"], job["result_fd"], to_candidate[1], from_candidate[0]]
    checker = os.fork()
    if checker == 0:
        try:
            os.dup2(null, 0)
            os.dup2(null, 1)
            for fd in fds:
                os.set_inheritable(fd, True)
            if job["checker_uid"] is not None:
                _become(job["checker_uid"])
            os.execve(python, [python, "-I", "-S", "-c", source, "check", *map(str, fds)], {})
        finally:
            os._exit(127)
    for fd in [*fds, null]:
        os.close(fd)
    os.close(2)  # the grader reads stderr to its end: only the checker may hold it
    pidfd = os.pidfd_open(checker)
    ready, _, _ = select.select([pidfd], [], [], job["wall_s"])
    uids = {u for u in (job["checker_uid"], job["candidate_uid"]) if u is not None}
    _clean_up(uids)
    os._exit(0 if ready else 124)


if __name__ == "__main__":
    role = sys.argv[1] if len(sys.argv) > 1 else "launch"
    if role == "candidate":
        candidate_main(int(sys.argv[2]), int(sys.argv[3]))
    elif role == "check":
        check_main(*map(int, sys.argv[2:7]))
    else:
        launch()
