"""DVC stage ``bridge``: fit the OPRD-Bridge bank (oprd-method.md §5.2-5.3), only for ``distill.method: oprd_bridge``.

Stage 0: the student base answers ``distill.bridge.num_prompts`` training prompts once each (on-policy, at
``rollout.temperature``); teacher and student run on the same token ids. Stage 1: per mapped layer pair
(proportional map, the ``distill.rep.layers`` / ``positions`` selection of the distill loss) a teacher PCA basis
and a student projector, with a validation split by whole responses (see :mod:`trainer.bridge`).

Writes into ``distill.bridge.bank`` (default ``artifacts/bridge``): ``bank.safetensors`` + ``bank.json`` (the
bank), ``pairs.parquet`` (the on-policy pairs: prompt index and response ids), ``bridge.json`` (summary with the
bank's digest: the record, strings included) and ``bridge.mlflow.json`` (the run ref), plus ``metrics/bridge.json``
(numbers only, for ``dvc metrics diff``). Logged to MLflow as the
``bridge`` run: teacher, student base, pairs digest, rank, validation cosine per layer pair, the fit curve.
Refuses (exit 2) a bank whose mean validation cosine is below ``distill.bridge.min_val_cosine``.

For every other method the stage is a no-op that only writes ``bridge.json`` = ``{"method": ..., "bank": null}``
and ``metrics/bridge.json`` = ``{"bridge/fitted": 0}`` (no models loaded, no MLflow run), so the default pipeline
stays as cheap as before.

    python -m pipelines.stage_bridge --params params.yaml
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from pipelines.preflight import sample_rollouts
from pipelines.stage_io import file_sha256, prompts_file, stage_cli, write_json
from pipelines.tracking import StageRun, TrackingUnreachable
from trainer.bridge import (
    BANK_FILE,
    BANK_META,
    BankMeta,
    FitResult,
    check_bank,
    collect_pair_rows,
    fit_projectors,
    save_bank,
    split_by_sequence,
)
from trainer.config import Params, load_params
from trainer.data import encode_prompts, load_prompts
from trainer.models import check_compatibility, load_model, load_tokenizer
from trainer.rollout import HFGenerateEngine

METRICS = Path("metrics/bridge.json")
SUMMARY = "bridge.json"
PAIRS = "pairs.parquet"
UPSTREAM = Path("artifacts/rollout/rollout.mlflow.json")

__all__ = [
    "BuiltBank",
    "PairRows",
    "bank_digest",
    "build_bank",
    "collect_pairs",
    "fit_rows",
    "main",
    "rank_sweep",
    "run",
]


@dataclass
class BuiltBank:
    fit: FitResult
    pairs: pd.DataFrame  # prompt_index, response_ids (valid tokens, EOS included)
    rows_train: int
    rows_val: int


def _manifest_sha(path: str) -> str | None:
    try:
        return str(json.loads((Path(path) / "manifest.json").read_text())["sha256"])
    except (OSError, ValueError, KeyError):
        return None


@dataclass
class PairRows:
    """Stage 0 output: per layer pair student / teacher rows, the validation split and the pairs table."""

    student_rows: list[torch.Tensor]
    teacher_rows: list[torch.Tensor]
    val: torch.Tensor
    pairs: pd.DataFrame
    student_layers: list[int]
    teacher_layers: list[int]
    d_student: int
    d_teacher: int


def collect_pairs(params: Params) -> PairRows:
    """Stage 0 for ``params``: load the pair, check compatibility (same tokenizer; hidden sizes may differ),
    let the student base answer ``distill.bridge.num_prompts`` prompts and capture both models' rows."""
    m, d = params.models, params.distill
    b = d.bridge
    tok = load_tokenizer(m.tokenizer or m.student.path, m)
    student = load_model(m.student, m, role="student", trainable=False)
    teacher = load_model(m.teacher, m, role="teacher", trainable=False)
    plan = check_compatibility(
        student, teacher, tok, load_tokenizer(m.teacher.path, m), d.rep, uses_hidden_states=False
    )
    prompts = load_prompts(prompts_file(params))[: b.num_prompts]
    gen = student.generation_config
    engine = HFGenerateEngine(
        pad_token_id=tok.pad_token_id, eos_token_id=gen.eos_token_id or tok.eos_token_id
    )
    seeded = params.model_copy(update={"seed": b.seed})  # sample_rollouts seeds torch with params.seed
    batch = sample_rollouts(student, encode_prompts(tok, prompts), seeded, engine)
    hs, ht, seq = collect_pair_rows(student, teacher, batch, plan.student, plan.teacher,
                                    positions=d.rep.positions, k=d.rep.k)  # fmt: skip
    lengths = batch.response_lengths.tolist()
    pairs = pd.DataFrame(
        {
            "prompt_index": batch.prompt_index.tolist(),
            "response_ids": [row[:n] for row, n in zip(batch.response_ids.tolist(), lengths, strict=True)],
            "response_length": lengths,
        }
    )
    return PairRows(hs, ht, split_by_sequence(seq, b.val_fraction, b.seed), pairs, plan.student, plan.teacher,
                    student.config.hidden_size, teacher.config.hidden_size)  # fmt: skip


def fit_rows(params: Params, rows: PairRows, rank: int | None = None) -> FitResult:
    """Stage 1 on collected rows, at ``distill.bridge.rank`` or the given ``rank``."""
    b = params.distill.bridge
    meta = BankMeta(
        student_layers=rows.student_layers, teacher_layers=rows.teacher_layers, rank=rank or b.rank,
        projector=b.projector, d_student=rows.d_student, d_teacher=rows.d_teacher,
    )  # fmt: skip
    return fit_projectors(rows.student_rows, rows.teacher_rows, rows.val, meta, max_pca_rows=b.max_pca_rows,
                          epochs=b.epochs, lr=b.lr, batch_rows=b.batch_rows, seed=b.seed)  # fmt: skip


def build_bank(params: Params) -> BuiltBank:
    """Stage 0 + Stage 1 for ``params`` (no MLflow, no files)."""
    rows = collect_pairs(params)
    val = rows.val
    return BuiltBank(
        fit_rows(params, rows), rows.pairs, rows_train=int((~val).sum()), rows_val=int(val.sum())
    )


def rank_sweep(params: Params, ranks: list[int]) -> list[dict]:
    """Fig. 12 on this pair: one Stage 0, then a fit per rank; rows of rank, validation cosine before / after
    fitting (mean and per layer pair) and the explained variance of the top-r teacher directions."""
    rows = collect_pairs(params)
    out = []
    for r in ranks:
        meta = fit_rows(params, rows, r).bank.meta
        out.append({
            "rank": r, "val_cosine_init_mean": sum(meta.val_cosine_init) / len(meta.val_cosine_init),
            "val_cosine_mean": meta.val_cosine_mean, "val_cosine": meta.val_cosine,
            "explained_variance": meta.explained_variance, "best_epoch": meta.best_epoch,
        })  # fmt: skip
    return out


def bank_digest(directory: Path) -> str:
    """sha256 over the bank's two files (tensors, then metadata): the bank's identity in lineage."""
    h = hashlib.sha256()
    for name in (BANK_FILE, BANK_META):
        h.update(file_sha256(directory / name).encode())
    return h.hexdigest()


def _noop(params: Params, out: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    summary = {"method": params.distill.method, "bank": None}
    write_json(out / SUMMARY, summary)  # the record (strings); the metrics file holds numbers only
    write_json(METRICS, {"bridge/fitted": 0})
    return summary


def run(params_path: str, overrides: list[str]) -> dict:
    params = load_params(params_path, overrides)
    d, m = params.distill, params.models
    out = Path(d.bridge.bank)
    if d.method != "oprd_bridge":
        return _noop(params, out)
    if params.optim.num_threads:
        torch.set_num_threads(params.optim.num_threads)
    upstream = [UPSTREAM] if UPSTREAM.is_file() else []
    prompts_digest = file_sha256(prompts_file(params))
    with StageRun("bridge", params, upstream=upstream, datasets={"train_prompts": prompts_digest}) as run:
        built = build_bank(params)
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True, exist_ok=True)
        built.pairs.to_parquet(out / PAIRS, index=False)
        pairs_sha = file_sha256(out / PAIRS)
        bank = built.fit.bank
        bank.meta.sources = {
            k: v
            for k, v in (
                ("teacher", _manifest_sha(m.teacher.path)),
                ("student", _manifest_sha(m.student.path)),
                ("pairs", pairs_sha),
                ("train_prompts", prompts_digest),
            )
            if v is not None
        }
        save_bank(bank, out)
        digest = bank_digest(out)
        meta = bank.meta
        summary = {
            "method": d.method,
            "bank": str(out / BANK_FILE),
            "bank_sha256": digest,
            "pairs_sha256": pairs_sha,
            "teacher": {"path": m.teacher.path, "sha256": meta.sources.get("teacher")},
            "student_base": {"path": m.student.path, "sha256": meta.sources.get("student")},
            "rank": meta.rank,
            "projector": meta.projector,
            "layer_pairs": bank.keys,
            "val_cosine_mean": meta.val_cosine_mean,
            "val_cosine": dict(zip(bank.keys, meta.val_cosine, strict=True)),
            "val_cosine_init": dict(zip(bank.keys, meta.val_cosine_init, strict=True)),
            "explained_variance": dict(zip(bank.keys, meta.explained_variance, strict=True)),
            "best_epoch": meta.best_epoch,
            "pairs": len(built.pairs),
            "rows_train": built.rows_train,
            "rows_val": built.rows_val,
        }
        write_json(out / SUMMARY, summary)
        metrics = {
            "bridge/val_cosine_mean": meta.val_cosine_mean,
            "bridge/val_cosine_init_mean": sum(meta.val_cosine_init) / len(meta.val_cosine_init),
            "bridge/best_epoch": meta.best_epoch,
            "bridge/rows_train": built.rows_train,
            "bridge/rows_val": built.rows_val,
            **{f"bridge/val_cosine/{k}": c for k, c in zip(bank.keys, meta.val_cosine, strict=True)},
            **{f"bridge/explained_variance/{k}": v for k, v in summary["explained_variance"].items()},
        }
        # numbers only (`dvc metrics diff`): the method, digests and paths are in the record <bank>/bridge.json
        write_json(METRICS, {"bridge/fitted": 1, "bridge/rank": meta.rank, **metrics})
        run.log_metrics(metrics)
        for row in built.fit.history:  # the fit curve: one MLflow step per epoch
            run.log_metrics(
                {f"bridge_fit/{k}": v for k, v in row.items() if k != "epoch"}, step=int(row["epoch"])
            )
        run.set_tags(
            {
                "oprd.bridge.rank": str(meta.rank),
                "oprd.bridge.projector": meta.projector,
                "oprd.bridge.bank.sha256": digest,
                "oprd.bridge.pairs.sha256": pairs_sha,
                "oprd.bridge.val_cosine_mean": f"{meta.val_cosine_mean:.4f}",
            }
        )
        run.client.log_artifact(run.run_id, str(out / BANK_META), "bridge")
        models = dict(run.upstream["rollout"].models) if "rollout" in run.upstream else {}
        run.write_ref(out / "bridge.mlflow.json", {"bank": digest, "pairs": pairs_sha}, models=models)
        # Pre-flight: the same check the trainer repeats when it loads the bank.
        check_bank(bank, meta.student_layers, meta.teacher_layers, meta.d_student, meta.d_teacher,
                   min_val_cosine=d.bridge.min_val_cosine)  # fmt: skip
    return summary


def main(argv: list[str] | None = None) -> int:
    def body(args) -> int:
        if args.sweep:  # a measurement, not the stage: no files, no MLflow run
            params = load_params(args.params, args.overrides)
            if params.optim.num_threads:
                torch.set_num_threads(params.optim.num_threads)
            rows = rank_sweep(params, [int(r) for r in args.sweep.split(",")])
            print(
                "| rank | val cosine before fit | val cosine after fit (mean) | per layer pair | explained variance |"
            )
            print("|---|---|---|---|---|")
            for r in rows:
                per = ", ".join(f"{c:.3f}" for c in r["val_cosine"])
                ev = ", ".join(f"{v:.2f}" for v in r["explained_variance"])
                print(
                    f"| {r['rank']} | {r['val_cosine_init_mean']:.3f} | {r['val_cosine_mean']:.3f} | {per} | {ev} |"
                )
            return 0
        print(json.dumps(run(args.params, args.overrides), indent=1))
        return 0

    def sweep_flag(ap) -> None:
        ap.add_argument(
            "--sweep", default=None, metavar="R1,R2,...", help="rank sweep (Fig. 12): print a table"
        )

    return stage_cli(
        "DVC stage: OPRD-Bridge bank", body, argv, errors=(TrackingUnreachable,), extra_args=sweep_flag
    )


if __name__ == "__main__":
    sys.exit(main())
