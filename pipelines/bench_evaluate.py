"""``oprd-ci bench evaluate``: the evaluate stage's throughput with each engine, side by side in one process.

For each engine in turn (``hf``, then ``vllm``) the same model directory is evaluated on the same suite with the same
:class:`~trainer.config.EvaluateConfig` through :func:`pipelines.evaluation.evaluate_model` (what the stage runs):
load, engine start-up (vLLM), sampling, grading. Reported per engine: ``seconds`` (the whole call),
``startup_seconds`` (vLLM's engine start-up, part of ``seconds``), ``problems_per_second`` = problems / seconds,
``sampling_problems_per_second`` = problems / (seconds - startup), ``tokens_per_second`` (response tokens, EOS
included, over the same sampling time), the metrics, and whether the per-problem rows equal the first engine's
(they do under greedy decoding, ``--temperature 0``; sampled rows differ: each engine has its own sampler).
The 1-minute load average is recorded before and after each engine (a shared machine's times follow it).
"""

from __future__ import annotations

import os
import platform
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from pipelines.evaluation import _resolve_device, evaluate_loaded, evaluate_model, start_vllm
from trainer.config import EvaluateConfig
from trainer.models import load_tokenizer

__all__ = ["evaluate_bench_markdown", "run_evaluate_bench"]


def _versions() -> dict[str, str | None]:
    import transformers

    from trainer.rollout_vllm import vllm_version

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "vllm": vllm_version(),
        "python": platform.python_version(),
    }


def run_evaluate_bench(
    model_dir: str | Path, cfg: EvaluateConfig, engines: list[str], *, role: str = "teacher"
) -> dict[str, Any]:
    """Evaluate ``model_dir`` on ``cfg.suites`` once per engine in ``engines``; returns the result dict."""
    if not engines or any(e not in ("hf", "vllm") for e in engines):
        raise ValueError(f"engines must be a non-empty list of hf / vllm, got {engines}")
    rows: list[dict[str, Any]] = []
    first: list[dict] | None = None
    for engine in engines:
        ecfg = cfg.model_copy(update={"engine": engine})
        load_before = os.getloadavg()[0]
        t0 = time.perf_counter()
        startup = 0.0
        if engine == "vllm":  # evaluate_model's vLLM branch, with the engine's start-up timed apart
            tokenizer = load_tokenizer(model_dir)
            served, eng = start_vllm(model_dir, tokenizer, ecfg, _resolve_device(ecfg.device))
            startup = eng.startup_seconds
            try:
                summary, problems = evaluate_loaded(served, tokenizer, ecfg.suites, ecfg, role, engine=eng,
                                                    progress=False)  # fmt: skip
            finally:
                eng.close()
        else:
            summary, problems = evaluate_model(model_dir, ecfg.suites, ecfg, role, progress=False)
        seconds = time.perf_counter() - t0
        n = len(problems)
        tokens = sum(sum(p.lengths) for p in problems)
        dump = [asdict(p) for p in problems]
        first = dump if first is None else first
        rows.append({
            "engine": engine,
            "seconds": seconds,
            "startup_seconds": startup,
            "problems": n,
            "response_tokens": tokens,
            "problems_per_second": n / seconds,
            "sampling_problems_per_second": n / (seconds - startup),
            "tokens_per_second": tokens / (seconds - startup),
            "rows_equal_first_engine": dump == first,
            "metrics": summary,
            "loadavg_before": load_before,
            "loadavg_after": os.getloadavg()[0],
        })  # fmt: skip
    return {
        "benchmark": "evaluate",
        "model_dir": str(model_dir),
        "evaluate": cfg.model_dump(mode="json", exclude={"engine"}),
        "versions": _versions(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "engines": rows,
    }


def evaluate_bench_markdown(result: dict[str, Any]) -> str:
    """The result as a markdown table (one row per engine, speed-ups against the first engine)."""
    ev, v = result["evaluate"], result["versions"]
    suites = ", ".join(
        f"{s['name']}" + (f" (first {s['limit']})" if s.get("limit") else "") for s in ev["suites"]
    )
    lines = [
        f"`{result['model_dir']} | {suites} | k={ev['k']} T={ev['temperature']} top_p={ev['top_p']} "
        f"max_new_tokens={ev['max_new_tokens']} batch {ev['batch_size']} | {result['cpu_count']} CPUs "
        f"x{result['threads']} torch threads | torch {v['torch']} transformers {v['transformers']} vllm {v['vllm']}`",
        "",
        "| engine | problems | s (all) | start-up s | problems/s (all) | problems/s (sampling) | tok/s (sampling) "
        "| speed-up (sampling) | rows equal | load avg before -> after |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    base = result["engines"][0]
    for r in result["engines"]:
        lines.append(
            f"| {r['engine']} | {r['problems']} | {r['seconds']:.1f} | {r['startup_seconds']:.1f} | "
            f"{r['problems_per_second']:.2f} | {r['sampling_problems_per_second']:.2f} | "
            f"{r['tokens_per_second']:.0f} | "
            f"{r['sampling_problems_per_second'] / base['sampling_problems_per_second']:.2f}x | "
            f"{'yes' if r['rows_equal_first_engine'] else 'no'} | {r['loadavg_before']:.1f} -> "
            f"{r['loadavg_after']:.1f} |"
        )
    return "\n".join(lines)
