"""Stage logs: third-party noise is dropped at the file-descriptor level, our own output is kept intact."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent(
    r"""
    import os, subprocess, sys
    from pipelines.stage_logs import quiet_third_party
    quiet_third_party()
    print("keep: ours", file=sys.stderr, flush=True)
    os.write(2, b"bar 0%|  0/300\rUSDT:2026-12-01 1:1 SyncActivityProfilerHandler.cpp:52] profiler_start\n")
    os.write(2, b"STAGE:2026-12-01 ActivityProfilerController.cpp:314] Completed Stage: Warm Up\n")
    os.write(2, b"Loading weights: 50%|#####\rbar 1%| 1/300 [loss=1.6, cos=0.85]\r")
    subprocess.run(["sh", "-c", "echo 'USDT: from a child' >&2; echo 'keep: child' >&2"])
    print(os.environ["TRANSFORMERS_VERBOSITY"], os.environ["HF_HUB_DISABLE_PROGRESS_BARS"], file=sys.stderr)
    print("error: the last line", file=sys.stderr)
    """
)


def test_noise_is_filtered_and_our_lines_pass_through() -> None:
    out = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, capture_output=True, timeout=120)
    err = out.stderr.decode()
    assert out.returncode == 0, err
    assert "USDT" not in err and "STAGE:" not in err and "Loading weights" not in err
    assert "keep: ours\n" in err and "keep: child\n" in err and err.endswith("error: the last line\n")
    assert "bar 0%|  0/300" in err and "bar 1%| 1/300 [loss=1.6, cos=0.85]\r" in err  # progress frames stay
    assert "error 1\n" in err  # transformers verbosity and hub progress bars, inherited by children


def test_distill_progress_bar_fields() -> None:
    from trainer.train import _bar_fields

    hist = [{"loss/total": 2.0, "val/accuracy": 0.25}, {"loss/total": 1.23456, "rep/cosine/mean": 0.9}]
    assert _bar_fields(hist) == {"loss": "1.235", "cos": "0.9", "val": "0.25"}
    assert _bar_fields([]) == {}


LIBRARY_SCRIPT = textwrap.dedent(
    r"""
    import subprocess, sys, warnings
    tmp, mode = sys.argv[1], sys.argv[2]
    if mode == "stage":
        from pipelines.stage_logs import quiet_third_party
        quiet_third_party(fd_filter=False)
    else:  # the control: what stage logs showed before these warnings were filtered
        warnings.simplefilter("once")
    from mlflow import MlflowClient
    MlflowClient(f"sqlite:///{tmp}/mlflow.db").search_experiments()  # MLflow's SQL store on SQLAlchemy 2
    child = "import sys, torch, torch.distributed.checkpoint as dcp; dcp.save({'w': torch.zeros(2)}, checkpoint_id=sys.argv[1])"
    subprocess.run([sys.executable, "-c", child, f"{tmp}/ckpt"], check=True)  # a DCP save in one process (a child)
    warnings.warn("keep: a warning about this run")
    """
)


def test_library_warnings_are_filtered_here_and_in_children(tmp_path) -> None:
    """Real SQLAlchemy (through MLflow's store) and DCP warnings: shown by the control, gone from a stage's log
    (also from its child processes, as torchrun workers), while other warnings still show."""
    env = {
        k: v for k, v in __import__("os").environ.items() if k not in ("OPRD_VERBOSE_LOGS", "PYTHONWARNINGS")
    }
    logs = {}
    for mode in ("control", "stage"):
        (tmp_path / mode).mkdir()
        out = subprocess.run([sys.executable, "-c", LIBRARY_SCRIPT, str(tmp_path / mode), mode], cwd=REPO,
                             env=env, capture_output=True, timeout=300)  # fmt: skip
        logs[mode] = out.stderr.decode()
        assert out.returncode == 0, logs[mode][-3000:]
    for noise in ("SADeprecationWarning", "torch.distributed is disabled"):
        assert noise in logs["control"], (noise, logs["control"][-3000:])  # the warnings are real
        assert noise not in logs["stage"], (noise, logs["stage"][-3000:])
    assert "keep: a warning about this run" in logs["stage"]
