"""``oprd-ci bench update|step``: the actor-update and whole-step cost benchmarks (see ``benchmarks/README.md``).

``register(app)`` mounts a ``bench`` sub-command group on the main typer app. Each command validates its flags
(one readable ``error: ...`` line and exit code 2 on a bad flag), runs the benchmark from :mod:`trainer.bench_update`
/ :mod:`trainer.bench_step`, writes the result JSON to ``--out`` and prints a rich table.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from trainer.bench_names import DTYPES, METHODS, OPTIMIZERS  # torch-free: `oprd-ci --help` stays fast

__all__ = ["bench_app", "engine_table_markdown", "register"]

bench_app = typer.Typer(
    help="Measure the cost (step time, transient peak memory) of each distillation method.",
    no_args_is_help=True,
    add_completion=False,
)
_err = Console(stderr=True)
_ALL = ",".join(METHODS)


def register(app: typer.Typer) -> None:
    """Add the ``bench`` group (``update``, ``step``) to ``app``."""
    app.add_typer(bench_app, name="bench")


def _fail(msg: str) -> typer.Exit:
    typer.echo(f"error: {msg}", err=True)
    return typer.Exit(code=2)


def _gib(b: int | None) -> str:
    return "-" if b is None else f"{b / 2**30:.3f}"


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def _write(result: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


def _header(result: dict) -> str:
    s = result["shape"]
    extra = ""
    eng = result.get("engine")
    engine = f" | engine {eng['name']} {eng['version']}" if eng else ""
    if result.get("checkpointing"):
        extra += " act-ckpt"
    if result.get("micro_batch_tokens") is not None and result.get("benchmark") == "update":
        extra += f" micro-batch {result['micro_batch_tokens']} tok"
    where = result["cpu"] if str(result.get("device", "cpu")) == "cpu" else result["device"]
    return (
        f"V={s['vocab']} d={s['hidden']} ff={s['intermediate']} L={s['layers']} "
        f"heads={s['heads']}/{s['kv_heads']} tied={s['tied']} params={s['params'] / 1e6:.1f}M | "
        f"{result['dtype']} {result['optimizer']}{extra} | {where} x{result['threads']} threads | "
        f"torch {result['versions']['torch']} transformers {result['versions']['transformers']}{engine}"
    )


def _counts(text: str, flag: str, *, allow_none: bool = False) -> list:
    """``"2,4,8"`` -> ``[2, 4, 8]``; with ``allow_none``, ``none``/``0`` -> ``None`` (one micro-batch)."""
    out: list = []
    for item in text.split(","):
        item = item.strip().lower()
        if allow_none and item in ("none", "0"):
            out.append(None)
            continue
        try:
            v = int(item)
        except ValueError:
            raise ValueError(f"{flag} {text!r}: expected comma-separated positive integers") from None
        if v < 1:
            raise ValueError(f"{flag} {text!r}: counts must be >= 1" + (" (or none)" if allow_none else ""))
        out.append(v)
    return out


def sweep_markdown(result: dict) -> str:
    """Markdown table of a memory sweep: one row per (sequences, method), one column per micro-batch budget."""
    budgets = result["micro_batch_tokens"]
    names = ["one micro-batch" if b is None else f"{b}-token micro-batches" for b in budgets]
    lines = [f"`{_header({**result, 'micro_batch_tokens': None})}`", ""]
    lines.append(
        "| sequences x tokens | method | " + " | ".join(f"peak GiB, {n}" for n in names) + " | ratio |"
    )
    lines.append("|---" * (len(budgets) + 3) + "|")
    cells = {(c["seqs"], c["method"], c["micro_batch_tokens"]): c for c in result["cells"]}
    methods = list(dict.fromkeys(c["method"] for c in result["cells"]))
    for n in result["sequences"]:
        for m in methods:
            row = [cells.get((n, m, b)) for b in budgets]
            vals = []
            for c in row:
                if c is None or c.get("peak_memory_bytes") is None:
                    vals.append("not run" if c is None else "failed")
                else:
                    vals.append(f"{_gib(c['peak_memory_bytes'])} ({c['micro_batches']} mb)")
            peaks = [c.get("peak_memory_bytes") if c else None for c in row]
            ratio = f"{peaks[-1] / peaks[0]:.2f}" if len(peaks) > 1 and peaks[0] and peaks[-1] else "-"
            lines.append(f"| {n} x {result['shape']['response_len']} | {m} | {' | '.join(vals)} | {ratio} |")
    return "\n".join(lines)


def update_table(result: dict) -> Table:
    """Rich table of a ``bench update`` result."""
    t = Table(title=f"actor update: {_header(result)}", title_justify="left")
    for col in ("method", "peak GiB", "median step s", "mem/O16", "time/O16", "mem/floor", "time/floor"):
        t.add_column(col, justify="left" if col == "method" else "right")
    for r in result["methods"]:
        t.add_row(
            r["name"], _gib(r["peak_memory_bytes"]), f"{r['median_step_seconds']:.2f}",
            _x(r["mem_vs_opd_topk"]), _x(r["time_vs_opd_topk"]), _x(r["mem_vs_floor"]), _x(r["time_vs_floor"]),
        )  # fmt: skip
    return t


def step_table(result: dict) -> Table:
    """Rich table of a ``bench step`` result (median seconds per phase, update peak)."""
    t = Table(title=f"on-policy step: {_header(result)}", title_justify="left")
    cols = ("method", "rollout s", "old-logprob s", "teacher s", "update s", "sync s", "total s", "rollout tok/s",
            "update peak MiB", "logits in update", "time/O16", "mem/O16")  # fmt: skip
    for col in cols:
        t.add_column(col, justify="left" if col == "method" else "right")
    for r in result["methods"]:
        ph = r["phases_median_seconds"]
        t.add_row(
            r["name"], *(f"{ph.get(p, 0.0):.3f}" for p in _STEP_PHASES), _tps(r),
            f"{r['peak_memory_bytes'] / 2**20:.1f}", "yes" if r["builds_logits_in_update"] else "no",
            _x(r["time_vs_opd_topk"]), _x(r["mem_vs_opd_topk"]),
        )  # fmt: skip
    eng = result.get("engine")
    if eng and eng["name"] == "vllm":
        t.caption = f"vLLM engine start-up {eng['startup_seconds']:.1f}s (once per run, not in the step)"
    return t


_STEP_PHASES = ("rollout", "old_logprob", "teacher", "update", "sync", "total")


def _tps(r: dict) -> str:
    v = r.get("rollout_tokens_per_second")
    return "-" if v is None else f"{v:.0f}"


def engine_table_markdown(hf: dict, vllm: dict) -> str:
    """Side by side, per method, two ``bench step`` results that differ only in ``--engine`` (markdown)."""
    for res, name in ((hf, "hf"), (vllm, "vllm")):
        if res.get("benchmark") != "step" or (res.get("engine") or {}).get("name") != name:
            raise ValueError(f"expected a bench step result with --engine {name}")
    by_name = {r["name"]: r for r in vllm["methods"]}
    eng = vllm["engine"]
    s = vllm["shape"]

    def load(res: dict) -> str:
        rounds = ", ".join(f"{v:.1f}" for v in res.get("loadavg_rounds") or [])
        start, end = ((res.get(k) or [float("nan")])[0] for k in ("loadavg_start", "loadavg_end"))
        return f"{start:.1f} -> {end:.1f} (rounds: {rounds or '-'})"

    lines = [
        f"`{_header(vllm)}`",
        "",
        f"shape: {s['prompts']} prompts x {s['n']} responses, up to {s['max_new_tokens']} new tokens "
        f"(prompts <= {s['prompt_len']} tokens); medians of {vllm['rounds']} rounds after {vllm['warmup']} "
        f"warm-up; {vllm['cpu_count']} CPUs, {vllm['threads']} torch threads",
        f"vLLM engine start-up (once per run): {eng['startup_seconds']:.1f} s "
        f"({'multiprocessing' if eng.get('multiprocessing') else 'in-process'} engine, "
        f"sync {eng.get('sync_route') or 'file'})",
        f"1-min load average, HF run: {load(hf)}; vLLM run: {load(vllm)}",
        "",
        "| method | HF step s | vLLM step s | speed-up | HF rollout tok/s | vLLM rollout tok/s | rollout speed-up "
        "| vLLM sync s | sync / step |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for h in hf["methods"]:
        v = by_name.get(h["name"])
        if v is None:
            continue
        hs, vs = h["median_step_seconds"], v["median_step_seconds"]
        ht, vt = h["rollout_tokens_per_second"], v["rollout_tokens_per_second"]
        sync = v["phases_median_seconds"]["sync"]
        lines.append(
            f"| {h['name']} | {hs:.3f} | {vs:.3f} | {hs / vs:.2f}x | {ht:.0f} | {vt:.0f} | {vt / ht:.2f}x | "
            f"{sync:.3f} | {100 * sync / vs:.1f}% |"
        )
    return "\n".join(lines)


def _shape(vocab, hidden, intermediate, layers, heads, kv_heads, untied):  # -> trainer.bench.ModelShape
    from trainer.bench import ModelShape

    return ModelShape(vocab, hidden, intermediate, layers, heads, kv_heads, tied=not untied)


def _layers_arg(text: str) -> str | list[int]:
    if text in ("last", "all", "even", "odd"):
        return text
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise ValueError(
            f"--oprd-layers {text!r}: use last, all, even, odd or comma-separated HF indices"
        ) from None


@bench_app.command("update")
def update(
    out: Path = typer.Option(..., "--out", help="Result JSON path."),
    methods: str = typer.Option(_ALL, help=f"Comma-separated subset of: {_ALL}."),
    vocab: int = typer.Option(151_936),
    hidden: int = typer.Option(896),
    intermediate: int = typer.Option(4864),
    layers: int = typer.Option(4),
    heads: int = typer.Option(14),
    kv_heads: int = typer.Option(2),
    untied: bool = typer.Option(False, "--untied", help="Separate LM head (default: tied embeddings)."),
    seqs: int = typer.Option(2, help="Sequences in the batch."),
    prompt_len: int = typer.Option(64, help="Prompt tokens per sequence."),
    response_len: int = typer.Option(1024, help="Response tokens per sequence."),
    dtype: str = typer.Option("fp32", help=f"One of {', '.join(DTYPES)} (bf16 = CPU autocast)."),
    optimizer: str = typer.Option("adamw-fused", help=f"One of {', '.join(OPTIMIZERS)}."),
    checkpointing: bool = typer.Option(
        False, "--checkpointing/--no-checkpointing", help="Activation checkpointing of the student's layers."
    ),
    micro_batch_tokens: str = typer.Option(
        "none",
        help="Token budget per micro-batch (none = one batch, targets prepared outside the measured region). "
        "With --sequences: a comma list, none/0 = one micro-batch with targets inside the region.",
    ),
    sequences: str = typer.Option(
        None, help="Memory sweep over sequences per rank, e.g. 2,4,8,16 (overrides --seqs; memory only)."
    ),
    device: str = typer.Option("cpu", help="cpu or cuda."),
    rounds: int = typer.Option(3, help="Timed rounds (round-robin over methods)."),
    warmup: int = typer.Option(
        0, help="Extra discarded warm-up rounds (the profiled round already warms up)."
    ),
    oprd_layers: str = typer.Option("all", help="OPRD layers: last|all|even|odd|i,j,..."),
    oprd_positions: str = typer.Option("all", help="OPRD positions: last|all|last_k|first_k."),
    oprd_k: int = typer.Option(2000, help="Width for last_k/first_k."),
    top_k: int = typer.Option(16, help="k of OPD top-k."),
    kl_chunk_size: int = typer.Option(256, help="Tokens per chunk of the chunked full KL."),
    threads: int = typer.Option(0, help="torch intra-op threads (0 = torch default)."),
    seed: int = typer.Option(0),
    quiet: bool = typer.Option(False, "--quiet", help="No progress lines."),
) -> None:
    """The actor update alone (student forward, backward, optimizer step) on one fixed synthetic batch."""
    from trainer.bench_update import UpdateBenchSpec, run_memory_sweep, run_update_bench

    try:
        if oprd_positions not in ("last", "all", "last_k", "first_k"):
            raise ValueError(f"--oprd-positions {oprd_positions!r}: use last, all, last_k or first_k")
        budgets = _counts(micro_batch_tokens, "--micro-batch-tokens", allow_none=True)
        sweep = _counts(sequences, "--sequences") if sequences else None
        if sweep is None and len(budgets) != 1:
            raise ValueError("--micro-batch-tokens takes one value without --sequences")
        spec = UpdateBenchSpec(
            micro_batch_tokens=budgets[0] if sweep is None else None, device=device,
            shape=_shape(vocab, hidden, intermediate, layers, heads, kv_heads, untied),
            seqs=seqs, prompt_len=prompt_len, response_len=response_len, dtype=dtype, optimizer=optimizer,
            checkpointing=checkpointing, rounds=rounds, warmup=warmup, methods=methods.split(","),
            rep_layers=_layers_arg(oprd_layers), rep_positions=oprd_positions, rep_k=oprd_k, top_k=top_k,
            kl_chunk_size=kl_chunk_size, threads=threads, seed=seed,
        )  # fmt: skip
        spec.validate()
        if isinstance(spec.rep_layers, list):
            from trainer.hidden import layer_indices

            layer_indices(layers, spec.rep_layers)  # range check with its own message
    except ValueError as exc:
        raise _fail(str(exc)) from None
    log = (lambda _m: None) if quiet else (lambda m: _err.print(f"[dim]{m}[/dim]"))
    if sweep is not None:
        result = run_memory_sweep(spec, sweep, budgets, log=log)
        _write(result, out)
        typer.echo(sweep_markdown(result))
    else:
        result = run_update_bench(spec, log=log)
        _write(result, out)
        Console(width=170).print(update_table(result))
    typer.echo(f"wrote {out}")


@bench_app.command("step")
def step(
    out: Path = typer.Option(..., "--out", help="Result JSON path."),
    methods: str = typer.Option(_ALL, help=f"Comma-separated subset of: {_ALL}."),
    vocab: int = typer.Option(151_936),
    hidden: int = typer.Option(192),
    intermediate: int = typer.Option(512),
    layers: int = typer.Option(2),
    heads: int = typer.Option(4),
    kv_heads: int = typer.Option(2),
    untied: bool = typer.Option(False, "--untied"),
    prompts: int = typer.Option(4, help="Prompts per step."),
    n: int = typer.Option(2, help="Responses sampled per prompt."),
    prompt_len: int = typer.Option(16, help="Longest prompt (tokens)."),
    max_new_tokens: int = typer.Option(48),
    temperature: float = typer.Option(1.0),
    top_p: float = typer.Option(1.0),
    dtype: str = typer.Option("fp32", help=f"One of {', '.join(DTYPES)}."),
    optimizer: str = typer.Option("adamw-fused", help=f"One of {', '.join(OPTIMIZERS)}."),
    rounds: int = typer.Option(3),
    warmup: int = typer.Option(0),
    top_k: int = typer.Option(16),
    kl_chunk_size: int = typer.Option(256),
    threads: int = typer.Option(0),
    seed: int = typer.Option(0),
    engine: str = typer.Option(
        "hf", help="Rollout engine: hf | vllm (needs `bash scripts/setup.sh --vllm`)."
    ),
    vllm_inprocess: bool = typer.Option(
        False, "--vllm-inprocess", help="vLLM engine inside this process (default: multiprocessing)."
    ),
    teachers: str = typer.Option(
        "local", help="Teacher placements, comma-separated: local, ray:<replicas> (e.g. local,ray:1,ray:2)."
    ),
    micro_batch_tokens: int = typer.Option(0, help="Micro-batch token budget with --teachers (0 = one)."),
    vllm_sync: str = typer.Option(
        "direct",
        "--vllm-sync",
        help="How the engine applies a weight sync: direct (the model's loaders, one re-pack per layer) | "
        "reload (vLLM's layerwise reload) | file (multiprocessing: a safetensors file, then reload).",
    ),
    quiet: bool = typer.Option(False, "--quiet"),
) -> None:
    """A whole on-policy step per method: rollout, old-log-prob pass, teacher pass, update, weight sync."""
    from trainer.bench_step import StepBenchSpec, run_step_bench
    from trainer.config import ConfigError

    try:
        spec = StepBenchSpec(
            shape=_shape(vocab, hidden, intermediate, layers, heads, kv_heads, untied),
            prompts=prompts, n=n, prompt_len=prompt_len, max_new_tokens=max_new_tokens, temperature=temperature,
            top_p=top_p, dtype=dtype, optimizer=optimizer, rounds=rounds, warmup=warmup,
            methods=methods.split(","), top_k=top_k, kl_chunk_size=kl_chunk_size, threads=threads, seed=seed,
            engine=engine, vllm_multiprocessing=not vllm_inprocess, teachers=teachers.split(","),
            micro_batch_tokens=micro_batch_tokens or None, vllm_sync=vllm_sync,
        )  # fmt: skip
        spec.validate()
        if engine == "vllm":
            from trainer.rollout_vllm import require_vllm

            require_vllm()
    except ValueError as exc:  # ConfigError included
        raise _fail(str(exc)) from None
    log = (lambda _m: None) if quiet else (lambda m: _err.print(f"[dim]{m}[/dim]"))
    try:
        result = run_step_bench(spec, log=log)
    except ConfigError as exc:  # e.g. a head size vLLM's CPU kernels lack
        raise _fail(str(exc)) from None
    _write(result, out)
    Console(width=170).print(step_table(result))
    typer.echo(f"wrote {out}")


def markdown(result: dict) -> str:
    """A markdown table of a ``bench update`` or ``bench step`` result (for ``benchmarks/README.md``)."""

    def x(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}"

    if result.get("benchmark") == "update-sweep":
        return sweep_markdown(result)
    lines = [f"`{_header(result)}`", ""]
    if result.get("benchmark") == "step":
        lines += [
            "| method | rollout s | old-logprob s | teacher s | update s | sync s | total s | rollout tok/s "
            "| update peak MiB | logits in update | total/O16 | mem/O16 | total/floor | mem/floor |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in result["methods"]:
            ph = r["phases_median_seconds"]
            cells = [f"{ph.get(p, 0.0):.3f}" for p in _STEP_PHASES]
            lines.append(
                f"| {r['name']} | {' | '.join(cells)} | {_tps(r)} | {r['peak_memory_bytes'] / 2**20:.1f} | "
                f"{'yes' if r['builds_logits_in_update'] else 'no'} | {x(r['time_vs_opd_topk'])} | "
                f"{x(r['mem_vs_opd_topk'])} | {x(r['time_vs_floor'])} | {x(r['mem_vs_floor'])} |"
            )
    else:
        lines += [
            "| method | peak GiB (profiler) | peak GiB (RSS, median) | median step s | steps s | mem/O16 "
            "| time/O16 | mem/floor | time/floor |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in result["methods"]:
            steps = ", ".join(f"{s:.2f}" for s in r["step_seconds"])
            lines.append(
                f"| {r['name']} | {_gib(r['peak_memory_bytes'])} | {_gib(r.get('median_rss_peak_bytes'))} | "
                f"{r['median_step_seconds']:.2f} | {steps} | {x(r['mem_vs_opd_topk'])} | "
                f"{x(r['time_vs_opd_topk'])} | {x(r['mem_vs_floor'])} | {x(r['time_vs_floor'])} |"
            )
    return "\n".join(lines)


@bench_app.command("report")
def report(path: Path = typer.Argument(..., help="A result JSON written by bench update/step.")) -> None:
    """Print a result JSON as a markdown table."""
    try:
        result = json.loads(path.read_text())
        typer.echo(markdown(result))
    except (OSError, ValueError, KeyError) as exc:
        raise _fail(f"{path}: not a bench result ({exc})") from None


@bench_app.command("engines")
def engines(
    hf: Path = typer.Argument(..., help="bench step result JSON run with --engine hf."),
    vllm: Path = typer.Argument(..., help="bench step result JSON run with --engine vllm (same shape)."),
) -> None:
    """Print HF vs vLLM whole-step times, rollout tokens/s and sync share side by side (markdown)."""
    try:
        typer.echo(engine_table_markdown(json.loads(hf.read_text()), json.loads(vllm.read_text())))
    except (OSError, ValueError, KeyError) as exc:
        raise _fail(f"not a pair of bench step results: {exc}") from None


@bench_app.command("evaluate")
def evaluate(
    out: Path = typer.Option(..., "--out", help="Result JSON path."),
    model: Path = typer.Option(Path("artifacts/models/teacher"), help="Hugging Face model directory."),
    engines: str = typer.Option("hf,vllm", help="Comma-separated engines, run in this order: hf, vllm."),
    suite: Path | None = typer.Option(None, help="Eval suite file (default: the embedded held-out set)."),
    embedded_path: str = typer.Option("artifacts/task/eval.jsonl", help="The embedded suite's file."),
    limit: int | None = typer.Option(None, help="First N problems only."),
    k: int = typer.Option(4, help="Responses per problem (evaluate.k)."),
    temperature: float = typer.Option(0.7, help="0 = greedy (then the engines' rows must be equal)."),
    top_p: float = typer.Option(0.95),
    max_new_tokens: int = typer.Option(42),
    batch_size: int = typer.Option(128, help="Prompts per generate call (evaluate.batch_size)."),
    threads: int = typer.Option(0, help="torch intra-op threads (0: leave as is)."),
    inprocess: bool = typer.Option(True, "--vllm-inprocess/--vllm-multiprocessing", help="vLLM engine mode."),
    quiet: bool = typer.Option(False, "--quiet"),
) -> None:
    """The evaluate stage's throughput (problems/s) per engine on one model and suite, side by side."""
    import torch

    from pipelines.bench_evaluate import evaluate_bench_markdown, run_evaluate_bench
    from trainer.config import ConfigError, EvalSuite, EvaluateConfig

    if threads > 0:
        torch.set_num_threads(threads)
    try:
        cfg = EvaluateConfig(
            k=k, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, batch_size=batch_size,
            suites=[EvalSuite(name=suite.stem if suite else "embedded", path=str(suite) if suite else None,
                              limit=limit)],
            embedded_path=embedded_path, vllm={"multiprocessing": not inprocess},
        )  # fmt: skip
        result = run_evaluate_bench(model, cfg, [e.strip() for e in engines.split(",")])
    except (ValueError, ConfigError, FileNotFoundError) as exc:
        raise _fail(str(exc)) from None
    _write(result, out)
    typer.echo(evaluate_bench_markdown(result))
    if not quiet:
        typer.echo(f"wrote {out}")
