"""DVC stage ``evaluate``: score the teacher, the student base and the distilled students (best-on-validation and
last step) on every suite (``evaluate.roles``).

    python -m pipelines.stage_evaluate --params params.yaml

Writes ``metrics/eval.json`` ``{suite: {role: metrics}}``, ``artifacts/eval/per_problem.jsonl`` (paired
comparisons; the gate's evidence), ``artifacts/eval/responses.jsonl`` and ``artifacts/eval/suites.json``
``{suite: {"digest", "graders": {name: version}}}`` (what the numbers are comparable by; strings stay out of the
metrics file). The same record is on the run as tags ``oprd.eval.<suite>.grader`` / ``.grader_version`` /
``.digest``; the engine that sampled (``evaluate.engine``) as ``oprd.evaluate.engine`` / ``.engine_version``. Each role is evaluated with the same seed, so the three models see the same sampling stream.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from pipelines.evaluation import evaluate_model, write_eval_outputs
from pipelines.failures_stages import REGRESSION_ROLES, regression_suites, score_champion
from pipelines.stage_distill import FINAL_DIR, STUDENT_DIR
from pipelines.stage_distill import REF as DISTILL_REF
from pipelines.stage_io import file_sha256, stage_cli, write_json
from pipelines.suites import load_suite, suite_record, suite_tags
from pipelines.tracking import StageRun, TrackingUnreachable
from pipelines.tracking_models import log_dataset, log_model_inputs, log_model_metrics
from trainer.config import Params, load_params

METRICS = Path("metrics/eval.json")
REF = Path("artifacts/eval/evaluate.mlflow.json")
SUITES = Path("artifacts/eval/suites.json")
"""``{suite: {"digest", "graders": {name: version}}}``: read by the gate into its evidence."""
ROLLOUT_REF = Path("artifacts/rollout/rollout.mlflow.json")


def model_dirs(params: Params) -> dict[str, Path]:
    """The models of ``evaluate.roles``: ``student`` is the distill stage's export (best on validation),
    ``student_final`` its last-step student."""
    every = {
        "teacher": Path(params.models.teacher.path),
        "student_base": Path(params.models.student.path),
        "student": STUDENT_DIR,
        "student_final": FINAL_DIR,
    }
    return {role: every[role] for role in params.evaluate.roles}


def preflight_engine(params: Params) -> dict[str, str]:
    """``evaluate.engine: vllm``: one clear :class:`~trainer.config.ConfigError` line, before any run is opened or
    model loaded, when vLLM is missing or cannot serve one of the evaluated models. Returns the run's
    ``oprd.evaluate.engine`` / ``oprd.evaluate.engine_version`` tags (``hf``: the transformers version)."""
    if params.evaluate.engine == "hf":
        import transformers

        return {"oprd.evaluate.engine": "hf", "oprd.evaluate.engine_version": transformers.__version__}
    from transformers import AutoConfig

    from trainer.rollout_vllm import require_vllm

    device = "cuda" if params.evaluate.device != "cpu" and torch.cuda.is_available() else "cpu"
    version = require_vllm(key="evaluate.engine")
    for path in model_dirs(params).values():
        require_vllm(AutoConfig.from_pretrained(path), device, key="evaluate.engine")
    return {"oprd.evaluate.engine": "vllm", "oprd.evaluate.engine_version": version}


def run(params_path: str, overrides: list[str]) -> dict:
    params = load_params(params_path, overrides)
    if params.optim.num_threads:
        torch.set_num_threads(params.optim.num_threads)
    t0 = time.perf_counter()
    suites = [load_suite(s, params.evaluate.embedded_path) for s in params.evaluate.suites]
    regression = regression_suites(params)  # the failure bank's held-out share: students and the champion
    digests = {f"eval_{s.name}": s.digest for s in [*suites, *regression]}
    records = {s.name: suite_record(s) for s in [*suites, *regression]}
    engine_tags = preflight_engine(params)
    with StageRun("evaluate", params, upstream=[DISTILL_REF, ROLLOUT_REF], datasets=digests) as run:
        run.set_tags({**suite_tags(records), **engine_tags})
        for s in [*suites, *regression]:
            log_dataset(run.run_id, s.path, f"eval_{s.name}", "evaluation", s.digest, client=run.client)
        models = {**run.upstream["rollout"].models, **run.upstream["distill"].models}
        log_model_inputs(run.run_id, list(models.values()), client=run.client)
        results = {
            role: evaluate_model(
                path, [*suites, *(regression if role in REGRESSION_ROLES else [])], params.evaluate, role
            )
            for role, path in model_dirs(params).items()
        }
        results.update(score_champion(params, regression))
        tree = write_eval_outputs(results, METRICS)
        write_json(SUITES, records)
        run.log_metrics({
            f"{suite}/{role}/{k}": v
            for suite, roles in tree.items() for role, m in roles.items()
            for k, v in m.items() if isinstance(v, (int, float))
        })  # fmt: skip
        # The same keys against each LoggedModel and the eval dataset: the experiment's Models view then
        # compares teacher, student base and student side by side, each row linked to its model page.
        by_suite = {s.name: s for s in [*suites, *regression]}
        for suite, roles in tree.items():
            for role, m in roles.items():
                if role in models:
                    log_model_metrics(
                        run.run_id, models[role],
                        {f"{suite}/{k}": v for k, v in m.items() if isinstance(v, (int, float))},
                        dataset_name=f"eval_{suite}", dataset_digest=by_suite[suite].digest, client=run.client,
                    )  # fmt: skip
        per_problem = Path("artifacts/eval/per_problem.jsonl")
        run.write_ref(REF, {"per_problem": file_sha256(per_problem), **digests}, models=models)
    return {"tree": tree, "suites": records, "wall_seconds": time.perf_counter() - t0}


def main(argv: list[str] | None = None) -> int:
    def body(args) -> int:
        for suite, roles in run(args.params, args.overrides)["tree"].items():
            for role, m in roles.items():
                print(f"{suite:>10} {role:>13}: avg@k {m['avg_at_k']:.3f}  len {m['mean_length']:.1f}")
        return 0

    return stage_cli("DVC stage: evaluation", body, argv, errors=(TrackingUnreachable,))


if __name__ == "__main__":
    sys.exit(main())
