"""DVC stage ``rollout``: pre-flight checks on the student base's own on-policy rollouts.

Reads the teacher, the student base and the training prompts; writes ``artifacts/rollout/rollouts.parquet``
(prompt index, response token ids and lengths) and ``metrics/rollout.json`` (response-length statistics and the
per-layer alignment). Fails (exit 2, one line) on an incompatible pair, or when vanilla OPRD is configured on an
unaligned pair (see :mod:`pipelines.preflight`).

    python -m pipelines.stage_rollout --params params.yaml
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pandas as pd
import torch

from pipelines.preflight import AlignmentError, check_alignment, measure_alignment, sample_rollouts
from pipelines.stage_io import BOOTSTRAP_RECORDS, file_sha256, prompts_file, stage_cli, write_json
from pipelines.tracking import StageRun, TrackingUnreachable
from pipelines.tracking_models import ensure_source_models, log_dataset, log_model_inputs
from trainer.config import load_params
from trainer.data import encode_prompts, load_prompts
from trainer.methods import method_spec
from trainer.models import check_compatibility, load_model, load_tokenizer
from trainer.rollout import build_engine, provenance_tags
from trainer.train import fit_prompts

OUT_DIR = Path("artifacts/rollout")
METRICS = Path("metrics/rollout.json")
REF = OUT_DIR / "rollout.mlflow.json"
LAYER_PLAN = OUT_DIR / "layer_plan.json"
BOOTSTRAP_RECORD = BOOTSTRAP_RECORDS["arithmetic"]


def run(params_path: str, overrides: list[str]) -> dict:
    params = load_params(params_path, overrides)
    m = params.models
    if params.optim.num_threads:
        torch.set_num_threads(params.optim.num_threads)
    prompts_path = prompts_file(params)
    digest = file_sha256(prompts_path)
    if params.rollout.engine == "vllm":  # pre-flight: one clear line before any run is opened or work done
        from transformers import AutoConfig

        from trainer.rollout_vllm import require_vllm

        require_vllm(
            AutoConfig.from_pretrained(m.student.path), "cuda" if torch.cuda.is_available() else "cpu"
        )
    sampling = provenance_tags(params.rollout, n=params.rollout.n_responses, seed=params.seed)
    with StageRun("rollout", params, datasets={"train_prompts": digest}, extra_tags=sampling) as run:
        log_dataset(run.run_id, prompts_path, "train_prompts", "training", digest, client=run.client)
        # Logged once, by the run that produced them (bootstrap or "register external"), not by this consumer.
        model_ids = ensure_source_models(
            {"teacher": m.teacher.path, "student_base": m.student.path},
            experiment_id=run.experiment_id, embedded=m.embedded, bootstrap_record=BOOTSTRAP_RECORDS[params.task.name],
            copy_max_mb=params.tracking.copy_weights_max_mb, client=run.client,
        )  # fmt: skip
        log_model_inputs(run.run_id, list(model_ids.values()), client=run.client)
        tok = load_tokenizer(m.tokenizer or m.student.path, m)
        student = load_model(m.student, m, role="student", trainable=False)
        teacher = load_model(m.teacher, m, role="teacher", trainable=False)
        plan = check_compatibility(
            student, teacher, tok, load_tokenizer(m.teacher.path, m), params.distill.rep,
            uses_hidden_states=method_spec(params.distill.method).hidden_states,
        )  # fmt: skip
        prompts = load_prompts(prompts_path)[: params.rollout.num_prompts]
        prompt_ids = fit_prompts(encode_prompts(tok, prompts), student, params)
        gen = student.generation_config
        engine = build_engine(
            params.rollout, student, pad_token_id=tok.pad_token_id,
            eos_token_id=gen.eos_token_id or tok.eos_token_id, seed=params.seed,
        )  # fmt: skip
        try:
            batch = sample_rollouts(student, prompt_ids, params, engine)
        finally:
            engine.close()
        report = measure_alignment(student, teacher, batch, plan)
        lengths = batch.response_lengths.float()
        metrics = {
            "response/length_mean": lengths.mean().item(),
            "response/length_median": lengths.median().item(),
            "response/length_max": lengths.max().item(),
            "response/eos_rate": (batch.response_ids == engine.eos_token_id[0])
            .any(dim=1)
            .float()
            .mean()
            .item(),
            "rollouts": int(lengths.numel()),
            **report.as_metrics(),
        }
        OUT_DIR.mkdir(parents=True, exist_ok=True)
        rollouts = OUT_DIR / "rollouts.parquet"
        pd.DataFrame(
            {
                "prompt_index": batch.prompt_index.tolist(),
                "response_ids": [
                    row[: int(n)]
                    for row, n in zip(batch.response_ids.tolist(), lengths.tolist(), strict=True)
                ],
                "response_length": lengths.long().tolist(),
            }
        ).to_parquet(rollouts, index=False)
        layer_plan = {"student": plan.student, "teacher": plan.teacher, "notes": plan.notes}
        summary = {"metrics": metrics, "layer_plan": layer_plan}
        write_json(METRICS, metrics)  # numbers only (dvc metrics show); the plan is a record of its own
        write_json(LAYER_PLAN, layer_plan)
        run.client.log_artifact(run.run_id, str(LAYER_PLAN))
        run.log_metrics(metrics)
        rollouts_sha = file_sha256(rollouts)
        log_dataset(run.run_id, rollouts, "rollouts", "produced", rollouts_sha, client=run.client)
        cosine = report.mean_cosine
        run.set_tags(
            {
                "oprd.alignment.cosine_mean": f"{cosine:.4f}"
                if math.isfinite(cosine)
                else "n/a (hidden sizes differ)"
            }
        )
        run.write_ref(REF, {"rollouts": rollouts_sha, "train_prompts": digest}, models=model_ids)
        warning = check_alignment(report, params)
        if warning:
            print(warning, file=sys.stderr)
    return summary


def main(argv: list[str] | None = None) -> int:
    def body(args) -> int:
        print(json.dumps(run(args.params, args.overrides)["metrics"], indent=1))
        return 0

    return stage_cli(
        "DVC stage: rollout and pre-flight", body, argv, errors=(AlignmentError, TrackingUnreachable)
    )


if __name__ == "__main__":
    sys.exit(main())
