"""code_tests grader and its sandbox: HumanEval canonical solutions pass, shuffled ones fail, escapes do not pass,
limits hold, and nothing (process, temporary directory) outlives a run."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import tempfile
from pathlib import Path

import psutil
import pytest

from pipelines.graders import InvalidReference, check_reference, grade_many, grade_result
from pipelines.graders.sandbox import TEMP_PREFIX, SandboxLimits, run_tests, sandbox_mode

HUMAN_EVAL = [
    json.loads(line)
    for line in gzip.decompress(
        (Path(__file__).parents[1] / "data" / "HumanEval.jsonl.gz").read_bytes()
    ).splitlines()
]
ISOLATED = sandbox_mode() == "isolated"
needs_root = pytest.mark.skipif(
    not ISOLATED, reason="namespaces and uid separation need root (CI runs as root)"
)


def reference(problem: dict) -> dict:
    return {"tests": problem["test"], "entry_point": problem["entry_point"], "prompt": problem["prompt"]}


def shuffled(problems: list[dict]) -> list[tuple[str, dict]]:
    """Each problem's tests against the next problem's canonical solution."""
    return [
        (nxt["canonical_solution"], reference(p))
        for p, nxt in zip(problems, problems[1:] + problems[:1], strict=True)
    ]


@pytest.fixture
def own_tempdir(tmp_path, monkeypatch):
    """Sandbox temp dirs go under a directory of this test only (other processes may grade at the same time)."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return tmp_path


_BEFORE: set[int] = set()
"""Children this test process already had when the test started (e.g. the ``multiprocessing`` resource tracker a
vLLM test of the same session started: it lives until the test process exits); not the sandbox's leftovers."""


@pytest.fixture(autouse=True)
def _children_before():
    _BEFORE.clear()
    _BEFORE.update(c.pid for c in psutil.Process().children(recursive=True))
    yield


def leftovers(tmp: Path, uids: list[int]) -> tuple[list, list, list]:
    me = psutil.Process()
    children = [
        c
        for c in me.children(recursive=True)
        if c.pid not in _BEFORE and c.is_running() and c.status() != psutil.STATUS_ZOMBIE
    ]
    by_uid = [p.pid for p in psutil.process_iter(["uids"]) if p.info["uids"] and p.info["uids"].real in uids]
    return children, by_uid, sorted(tmp.glob(f"{TEMP_PREFIX}*"))


ADD_TESTS = "def check(candidate):\n    assert candidate(1, 2) == 3\n    assert candidate(-1, 1) == 0\n"


def add_ref(**extra) -> dict:
    return {"tests": ADD_TESTS, "entry_point": "add", **extra}


# ------------------------------------------------------------------------------------------------ HumanEval

SAMPLE = HUMAN_EVAL[::16]  # 11 problems, deterministic


def test_human_eval_sample_canonical_pass_and_shuffled_fail(own_tempdir):
    pairs = [(p["canonical_solution"], reference(p)) for p in SAMPLE]
    results = grade_many("code_tests", pairs + shuffled(SAMPLE), workers=2)
    canonical, wrong = results[: len(SAMPLE)], results[len(SAMPLE) :]
    assert all(r.correct for r in canonical), [
        (p["task_id"], r.reason) for p, r in zip(SAMPLE, canonical, strict=True)
    ]
    assert not any(r.correct for r in wrong)
    assert all(r.reason for r in wrong)
    assert leftovers(own_tempdir, [])[2] == []


@pytest.mark.slow
def test_human_eval_all_canonical_pass_and_all_shuffled_fail(own_tempdir):
    pairs = [(p["canonical_solution"], reference(p)) for p in HUMAN_EVAL]
    results = grade_many("code_tests", pairs + shuffled(HUMAN_EVAL), workers=2)
    canonical, wrong = results[: len(HUMAN_EVAL)], results[len(HUMAN_EVAL) :]
    failed = [(p["task_id"], r.reason) for p, r in zip(HUMAN_EVAL, canonical, strict=True) if not r.correct]
    assert failed == []
    passed = [p["task_id"] for p, r in zip(HUMAN_EVAL, wrong, strict=True) if r.correct]
    assert passed == []
    assert leftovers(own_tempdir, [])[2] == []


# ------------------------------------------------------------------------------------------------ verdicts


def test_correct_code_passes_in_every_response_shape():
    assert grade_result("code_tests", "def add(a, b):\n    return a + b\n", add_ref()).correct
    fenced = "Here you go:\n```python\ndef add(a, b):\n    return a + b\n```\nHope it helps."
    assert grade_result("code_tests", fenced, add_ref()).correct
    body = "    return a + b\n"  # a HumanEval-style completion of the prompt
    assert grade_result("code_tests", body, add_ref(prompt="def add(a, b):\n    '''Sum.'''\n")).correct


def test_failing_code_says_which_test_line():
    result = grade_result("code_tests", "def add(a, b):\n    return a - b\n", add_ref())
    assert not result.correct
    assert "AssertionError at tests line 2: assert candidate(1, 2) == 3" in result.reason
    result = grade_result("code_tests", "def add(a, b):\n    raise ValueError('nope')\n", add_ref())
    assert not result.correct and "candidate raised ValueError: nope" in result.reason
    result = grade_result("code_tests", "def add(a, b) return", add_ref())
    assert not result.correct and "does not run: SyntaxError" in result.reason
    result = grade_result("code_tests", "def plus(a, b):\n    return a + b\n", add_ref())
    assert not result.correct and "does not define 'add'" in result.reason


ESCAPES = {
    "sys.exit(0) before the tests": "import sys\nsys.exit(0)\n",
    "sys.exit(0) in the function": "import sys\ndef add(a, b):\n    sys.exit(0)\n",
    "os._exit(0) in the function": "import os\ndef add(a, b):\n    os._exit(0)\n",
    "kill the parent": "import os, signal\ndef add(a, b):\n    os.kill(os.getppid(), signal.SIGKILL)\n",
    "kill the process group": "import os, signal\ndef add(a, b):\n    os.killpg(0, signal.SIGKILL)\n",
    "redefine check": "def check(candidate):\n    return True\ndef add(a, b):\n    return 0\n",
    "print passed": "print('passed')\nprint('All tests passed')\ndef add(a, b):\n    print('passed')\n    return 0\n",
    "patch builtins": (
        "import builtins\nclass Never(Exception):\n    pass\nbuiltins.AssertionError = Never\n"
        "builtins.__import__ = None\ndef add(a, b):\n    return 0\n"
    ),
    "always-equal object": "class Eq:\n    def __eq__(self, other):\n        return True\ndef add(a, b):\n    return Eq()\n",
    "stdlib object equal to everything": "from unittest import mock\ndef add(a, b):\n    return mock.ANY\n",
    "int subclass equal to everything": (
        "class Eq(int):\n    def __eq__(self, other):\n        return True\ndef add(a, b):\n    return Eq(0)\n"
    ),
    "forge a reason on stderr": (
        "import os, sys\ndef add(a, b):\n    os.write(2, b'FORGED\\n')\n    print('FORGED', file=sys.stderr)\n"
        "    sys.stderr.flush()\n    os._exit(0)\n"
    ),
    "write guesses to every fd": (
        "import os\ndef add(a, b):\n    for fd in range(3, 1024):\n        try:\n"
        "            os.write(fd, b'0' * 64)\n        except OSError:\n            pass\n    os._exit(0)\n"
    ),
    "write to the parent's fds via /proc": (
        "import os\ndef add(a, b):\n    for pid in (os.getppid(), os.getppid() + 1, os.getppid() + 2):\n"
        "        try:\n            for fd in os.listdir(f'/proc/{pid}/fd'):\n"
        "                try:\n                    with open(f'/proc/{pid}/fd/{fd}', 'wb') as f:\n"
        "                        f.write(b'0' * 64)\n                except OSError:\n                    pass\n"
        "        except OSError:\n            pass\n    return 0\n"
    ),
}


@pytest.mark.parametrize("code", list(ESCAPES.values()), ids=list(ESCAPES))
def test_escapes_are_not_a_pass(code, own_tempdir):
    result = run_tests(code, ADD_TESTS, "add", limits=SandboxLimits(wall_s=10))
    assert not result.passed, result
    assert result.reason and "FORGED" not in result.reason
    children, by_uid, dirs = leftovers(own_tempdir, result.extra["uids"])
    assert (children, by_uid, dirs) == ([], [], [])


# ------------------------------------------------------------------------------------------------ limits


def test_wall_timeout_covers_a_child_that_ignores_sigterm_and_forks(own_tempdir):
    code = (
        "import os, signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "def add(a, b):\n    if os.fork() == 0:\n        os.setsid()\n        signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "        time.sleep(1000)\n    while True:\n        pass\n"
    )
    result = run_tests(code, ADD_TESTS, "add", limits=SandboxLimits(wall_s=3, cpu_s=60))
    assert not result.passed
    assert result.reason == "timed out after 3 s"
    assert leftovers(own_tempdir, result.extra["uids"]) == ([], [], [])


def test_forked_sleeping_child_does_not_outlive_a_passing_run(own_tempdir):
    code = (
        "import os, time\ndef add(a, b):\n    if os.fork() == 0:\n        os.setsid()\n        time.sleep(1000)\n"
        "    return a + b\n"
    )
    result = run_tests(code, ADD_TESTS, "add")
    assert result.passed, result.reason
    assert leftovers(own_tempdir, result.extra["uids"]) == ([], [], [])


def test_memory_limit():
    code = "def add(a, b):\n    x = bytearray(2 << 30)\n    return a + b\n"
    result = run_tests(code, ADD_TESTS, "add", limits=SandboxLimits(memory_bytes=1 << 30))
    assert not result.passed and "MemoryError" in result.reason


def test_file_size_limit(own_tempdir):
    code = "def add(a, b):\n    open('big', 'wb').write(b'0' * (8 << 20))\n    return a + b\n"
    result = run_tests(code, ADD_TESTS, "add", limits=SandboxLimits(file_bytes=1 << 20))
    assert not result.passed
    assert leftovers(own_tempdir, result.extra["uids"])[2] == []


@needs_root
def test_fork_bomb_is_bounded_and_cleaned_up(own_tempdir):
    code = (
        "import os\ndef add(a, b):\n    n = 0\n    try:\n        while True:\n            if os.fork() == 0:\n"
        "                import time\n                time.sleep(1000)\n            n += 1\n"
        "    except OSError:\n        return n\n"
    )
    tests = "def check(candidate):\n    assert candidate(1, 2) > 1000\n"
    result = run_tests(code, tests, "add", limits=SandboxLimits(processes=16))
    assert not result.passed
    assert "AssertionError" in result.reason  # the fork loop stopped at the limit (well below 1000)
    assert leftovers(own_tempdir, result.extra["uids"]) == ([], [], [])


# ------------------------------------------------------------------------------------------------ isolation

PROBE_TESTS = "def check(candidate):\n    assert candidate() == 'isolated', candidate()\n"


def probe(body: str) -> str:
    return "import os\ndef probe():\n" + "".join(f"    {line}\n" for line in body.splitlines())


def test_no_socket_can_be_created():
    code = probe(
        "import socket\ntry:\n    socket.socket()\nexcept PermissionError:\n    return 'isolated'\nreturn 'open'"
    )
    result = run_tests(code, PROBE_TESTS, "probe")
    assert result.passed, result.reason


def test_empty_environment():
    code = probe(
        "extra = sorted(set(os.environ) - {'LC_CTYPE'})\nreturn 'isolated' if not extra else str(extra)"
    )
    assert run_tests(code, PROBE_TESTS, "probe").passed


@needs_root
def test_no_network_interface_but_loopback():
    code = probe(
        "lines = open('/proc/net/dev').read().splitlines()[2:]\n"
        "names = sorted(line.split(':')[0].strip() for line in lines)\n"
        "return 'isolated' if names == ['lo'] else str(names)"
    )
    result = run_tests(code, PROBE_TESTS, "probe")
    assert result.passed, result.reason


@needs_root
def test_project_files_and_grader_temp_files_are_hidden(tmp_path):
    project_file = str(Path(__file__).resolve())
    marker = Path(tempfile.gettempdir()) / f"oprd-grader-marker-{os.getpid()}"
    marker.write_text("secret")
    try:
        paths = [project_file, str(marker), os.path.expanduser("~/.bashrc")]
        code = probe(
            f"seen = [p for p in {paths!r} if os.path.exists(p)]\nreturn 'isolated' if not seen else str(seen)"
        )
        result = run_tests(code, PROBE_TESTS, "probe")
        assert result.passed, result.reason
    finally:
        marker.unlink()


@needs_root
def test_candidate_runs_under_a_fresh_uid_it_cannot_use_to_signal_the_checker():
    code = probe(
        "import signal\nif os.getuid() in (0, os.stat('/proc/1').st_uid):\n    return 'root'\n"
        "try:\n    os.kill(os.getppid(), 0)\nexcept PermissionError:\n    return 'isolated'\nreturn 'can signal'"
    )
    result = run_tests(code, PROBE_TESTS, "probe")
    assert result.passed, result.reason


# ------------------------------------------------------------------------------------------------ parallel + refs


def test_grade_many_keeps_order_and_leaves_nothing(own_tempdir):
    good, bad = "def add(a, b):\n    return a + b\n", "def add(a, b):\n    return 0\n"
    sleeper = "import os, time\ndef add(a, b):\n    if os.fork() == 0:\n        time.sleep(1000)\n    return a + b\n"
    pairs = [(good, add_ref()), (bad, add_ref()), (sleeper, add_ref()), (bad, add_ref()), (good, add_ref())]
    results = grade_many("code_tests", pairs, workers=2)
    assert [r.correct for r in results] == [True, False, True, False, True]
    children, _by_uid, dirs = leftovers(own_tempdir, [])
    assert (children, dirs) == ([], [])


@pytest.mark.parametrize(
    ("ref", "message"),
    [
        ({"tests": "def check(candidate:\n    pass", "entry_point": "f"}, "do not compile"),
        ({"tests": "assert True", "entry_point": "f"}, "check\\(candidate\\)"),
        ({"tests": "def check(c): pass", "entry_point": "not a name"}, "not a Python name"),
        ({"tests": "def check(c): pass", "entry_point": "f", "prompt": "def f(:"}, "'prompt' do not compile"),
        ({"tests": "def check(c): pass"}, "entry_point"),
        ({"tests": "def check(c): pass", "entry_point": "f", "solution": "x"}, "unknown keys"),
        ("def check(c): pass", "not valid JSON"),
    ],
)
def test_invalid_references(ref, message):
    with pytest.raises(InvalidReference, match=message):
        check_reference("code_tests", ref)


@needs_root
def test_a_project_checked_out_under_tmp_still_grades_and_stays_hidden(monkeypatch, own_tempdir):
    """CI may clone the project into /tmp/<clone>: its parent is then /tmp itself, which must not be hidden over
    the fresh tmpfs (that would cover the interpreter's mount at /tmp/.python and no test could run), while the
    checkout stays invisible (the fresh tmpfs over /tmp hides it)."""
    from pipelines.graders import sandbox

    clone = Path(tempfile.mkdtemp(prefix="oprd-clone-", dir="/tmp"))
    try:
        (clone / "secret.txt").write_text("x")
        monkeypatch.setattr(sandbox, "_PROJECT_ROOT", clone)
        assert "/tmp" not in sandbox._hidden_paths()
        assert grade_result("code_tests", "def add(a, b):\n    return a + b\n", add_ref()).correct
        code = probe(f"return 'isolated' if not os.path.exists({str(clone / 'secret.txt')!r}) else 'seen'")
        result = run_tests(code, PROBE_TESTS, "probe")
        assert result.passed, result.reason
    finally:
        shutil.rmtree(clone)
