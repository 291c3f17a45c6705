"""PeakMemory: allocator-exact profiler replay, the RSS cross-check (in a subprocess with the malloc settings)."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from trainer.memory import MALLOC_ENV, PeakMemory, replay_peak

MIB = 1024**2
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def test_replay_peak_orders_by_time_and_floors_at_zero():
    # out-of-order input: alloc 10 @1, alloc 5 @2, free 10 @3, free 7 (allocated before the region) @0
    assert replay_peak([(3, -10), (1, 10), (2, 5), (0, -7)]) == 8
    assert replay_peak([]) == 0
    assert replay_peak([(0, -100)]) == 0


def test_profiler_reports_a_known_allocation():
    with PeakMemory("profiler") as pm:
        x = torch.empty(64 * MIB, dtype=torch.uint8)
        x.fill_(1)
        del x
    assert pm.method == "profiler"
    assert pm.peak_bytes == pytest.approx(64 * MIB, rel=0.03)


def test_profiler_peak_is_the_max_not_the_sum():
    # two 16 MiB tensors alive together, then freed, then one 8 MiB: peak is 32 MiB
    with PeakMemory("profiler") as pm:
        a, b = torch.ones(4 * MIB), torch.ones(4 * MIB)  # 4 Mi fp32 = 16 MiB each
        del a, b
        c = torch.ones(2 * MIB)
        del c
    assert pm.peak_bytes == pytest.approx(32 * MIB, rel=0.03)


def test_profiler_empty_region_is_about_zero():
    keep = torch.ones(MIB)  # allocated before: must not count
    with PeakMemory("profiler") as pm:
        pass
    assert pm.peak_bytes < 64 * 1024
    del keep


def test_auto_is_profiler_on_cpu_and_bad_method_is_refused():
    if not torch.cuda.is_available():
        assert PeakMemory("auto").method == "profiler"
    with pytest.raises(ValueError, match="unknown memory method"):
        PeakMemory("psutil")  # type: ignore[arg-type]


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc")
def test_rss_method_in_a_subprocess_with_malloc_settings():
    # glibc reads MALLOC_* at start-up, so the check runs in a fresh interpreter with them set.
    code = textwrap.dedent(
        """
        import torch
        from trainer.memory import PeakMemory
        torch.set_num_threads(1)
        warm = torch.ones(1024); del warm
        with PeakMemory("rss") as touched:
            x = torch.ones(48 * 1024**2 // 4)  # 48 MiB, every page touched
            del x
        with PeakMemory("rss") as idle:
            pass
        print(touched.peak_bytes, idle.peak_bytes)
        """
    )
    env = {**os.environ, **MALLOC_ENV, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    touched, idle = (int(v) for v in out.stdout.split())
    assert touched == pytest.approx(48 * MIB, rel=0.10)
    assert idle < 4 * MIB
