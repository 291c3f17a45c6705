"""DVC stage ``distill``: run the on-policy trainer and export the distilled student.

    python -m pipelines.stage_distill --params params.yaml

With ``parallel.nproc_per_node * nnodes > 1`` this process re-launches itself under ``torchrun`` (FSDP2); the
worker entry point is ``python -m pipelines.stage_distill --worker``. With ``parallel.launcher: ray`` it is the
driver of a Ray Train job instead (:mod:`trainer.ray_job`), whose workers run :func:`worker`; the MLflow run and
the outputs are the same, plus the job's cluster size and placement as tags. Checkpoints live under
``checkpoint.dir/<config digest>``, so a stage killed mid-run resumes where it stopped when re-run with the same
config, while an experiment with other params never resumes from them.

Outputs: ``artifacts/models/student/`` (HF safetensors + tokenizer + manifest; the best-on-validation checkpoint
when ``distill.select_best``; with ``signing.sign`` signed by ``model.sig`` + ``distillation.sigstore.json``,
docs/signing.md), ``artifacts/models/student-final/`` (the last step's student), ``metrics/distill.json``,
``plots/distill.tsv`` (per-step curves for ``dvc plots``), ``artifacts/distill/metrics.jsonl``.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from pipelines.attestation import SigningKeyMissing, sign_student
from pipelines.evaluation import grade_responses
from pipelines.failures_stages import BANK_DATASET, log_bank_input, training_prompts
from pipelines.stage_io import file_sha256, prompts_file, stage_cli, val_file, write_json
from pipelines.suites import load_problems, load_suite, suite_record
from pipelines.tracking import StageRun, TrackingUnreachable, git_state
from pipelines.tracking_metrics import MlflowMetricLogger
from pipelines.tracking_models import log_dataset, log_logged_model, log_model_inputs, log_model_outputs
from trainer.config import Params, load_params
from trainer.data import encode_prompts
from trainer.distributed import all_reduce_sum, torchrun_command
from trainer.metrics import JsonlLogger, LoggerGroup, MetricLogger, StepFloor
from trainer.ray_job import RayJobError, check_address, in_ray_worker, run_ray_job
from trainer.rollout import RolloutEngine, provenance_tags
from trainer.train import NonFiniteLossError, Trainer

WORK_DIR = Path("artifacts/distill")
STUDENT_DIR = Path("artifacts/models/student")
FINAL_DIR = Path("artifacts/models/student-final")
METRICS = Path("metrics/distill.json")
PLOTS = Path("plots/distill.tsv")
CURVES = Path("plots/distill.png")
REF = WORK_DIR / "distill.mlflow.json"
RUN_RECORD = WORK_DIR / "run.json"
UPSTREAM = Path("artifacts/rollout/rollout.mlflow.json")
RUN_ENV = "OPRD_MLFLOW_RUN_ID"


class WorkerFailed(RuntimeError):
    """The torchrun workers failed; the stage fails (the MLflow run is marked FAILED)."""


URI_ENV = "OPRD_MLFLOW_TRACKING_URI"
PLOT_KEYS = (
    "loss/total",
    "rep/cosine/mean",
    "response/length_mean",
    "mem/actor_update_delta_peak_GiB",
    "perf/step_seconds",
    "val/accuracy",
)


def config_digest(params: Params) -> str:
    """Digest of everything that changes the training trajectory (not evaluation, tracking or gate)."""
    keys = ("seed", "models", "task", "rollout", "distill", "optim", "parallel")
    tree = {k: params.model_dump(mode="json")[k] for k in keys}
    # Who launches the ranks does not change the trajectory (same world size, same ranks): a job moved between
    # torchrun and Ray resumes from the same checkpoints, and older digests stay what they were.
    for key in ("launcher", "ray_address", "ray_max_failures"):
        tree["parallel"].pop(key)
    blob = json.dumps(tree, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class Validator:
    """Validation accuracy on the val split, sharded over ranks (each rank its slice, counts all-reduced).

    Used to choose the exported checkpoint; never the held-out eval set. ``distill.val.protocol``:

    * ``evaluate`` (default): ``evaluate.k`` samples per problem at ``evaluate.temperature`` / ``top_p`` /
      ``max_new_tokens``, score = mean correctness over all samples (Avg@k), i.e. what the evaluate stage reports.
      Sampling is seeded with ``evaluate.seed + rank`` inside a forked RNG, so every validation point draws the same
      stream (checkpoints are compared on common random numbers) and training's RNG stream is untouched.
    * ``greedy``: one greedy response per problem at ``rollout.max_new_tokens``.

    Each response is graded by its row's grader (``grader``/``reference`` columns, ``math`` by default), a batch
    at a time (``pipelines.evaluation.grade_responses``).
    """

    def __init__(self, trainer: Trainer, path: Path, params: Params):
        problems = load_problems(path)
        if params.distill.val.limit is not None:
            problems = problems[: params.distill.val.limit]
        self.problems = problems
        self.prompt_ids = encode_prompts(trainer.tokenizer, [p.prompt for p in problems])
        self.tokenizer = trainer.tokenizer
        self.engine: RolloutEngine = trainer.engine
        self.env = trainer.env
        ev = params.evaluate
        if params.distill.val.protocol == "evaluate":
            self.n, self.temperature, self.top_p = ev.k, ev.temperature, ev.top_p
            self.max_new_tokens = ev.max_new_tokens
        else:
            self.n, self.temperature, self.top_p = 1, 0.0, 1.0
            self.max_new_tokens = params.rollout.max_new_tokens
        self.seed = ev.seed
        self.batch_size = ev.batch_size

    def __call__(self, model: torch.nn.Module, step: int) -> dict[str, float]:
        rank, world = self.env.rank, self.env.world_size
        idx = list(range(rank, len(self.prompt_ids), world))
        # Every rank makes the same number of generate calls (synced_gpus needs it): as many chunks as the
        # largest slice needs, each rank's slice split into that many near-equal parts.
        n_chunks = max(1, math.ceil(math.ceil(len(self.prompt_ids) / world) / self.batch_size))
        bounds = [round(i * len(idx) / n_chunks) for i in range(n_chunks + 1)]
        correct = 0
        devices = [self.env.device] if self.env.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.seed + rank)
            for a, b in itertools.pairwise(bounds):
                part = idx[a:b] or idx[:1]  # an empty part still joins the collective generate
                batch = self.engine.generate(
                    model, [self.prompt_ids[i] for i in part], n=self.n, temperature=self.temperature,
                    top_p=self.top_p, max_new_tokens=self.max_new_tokens, synced_gpus=self.env.distributed,
                )  # fmt: skip
                if not idx[a:b]:
                    continue
                texts = self.tokenizer.batch_decode(batch.response_ids, skip_special_tokens=True)
                rows = [i for i in part for _ in range(self.n)]  # the n rows of a prompt are contiguous
                grades = grade_responses([(self.problems[i], t) for t, i in zip(texts, rows, strict=True)])
                correct += sum(g.correct for g in grades)
        counts = all_reduce_sum(torch.tensor([float(correct), float(len(idx) * self.n)]))
        return {"val/accuracy": (counts[0] / counts[1].clamp(min=1)).item()}


def worker(params_path: str, overrides: list[str], logger: MetricLogger | None = None) -> int:
    """Train (one rank of) the distillation; rank 0 writes the stage outputs and logs per-step metrics to the
    stage's MLflow run (its id comes from the launcher, in the environment under torchrun)."""
    params = load_params(params_path, overrides)
    if logger is None and os.environ.get(RUN_ENV) and int(os.environ.get("RANK", "0")) == 0:
        logger = MlflowMetricLogger(
            os.environ[RUN_ENV], tracking_uri=os.environ.get(URI_ENV), retries=params.tracking.retries,
            backoff_s=params.tracking.backoff_s, flush_every=10,
        )  # fmt: skip
        if in_ray_worker():  # a restarted Ray worker group logs into the run its first attempt began
            history = logger.client.get_metric_history(logger.run_id, "loss/total")
            logger = StepFloor(logger, max((m.step for m in history), default=0))
    digest = config_digest(params)
    ckpt_dir = str(Path(params.checkpoint.dir) / digest)
    params = params.model_copy(update={"checkpoint": params.checkpoint.model_copy(update={"dir": ckpt_dir})})
    trainer = Trainer(params, WORK_DIR, prompts=training_prompts(params, prompts_file(params))[0])
    vf = val_file(params)
    if vf is not None and params.distill.eval_every:
        trainer.validator = Validator(trainer, vf, params)
    if trainer.env.is_main:
        jsonl = JsonlLogger(WORK_DIR / "metrics.jsonl")  # fit() re-emits restored steps on resume
        trainer.logger = LoggerGroup(jsonl, *([logger] if logger else []))
    t0 = time.perf_counter()
    try:
        result = trainer.fit()
        # The last-step student as well as the exported (best-on-validation) one: a methods comparison reports
        # both, and the evaluate stage scores both.
        final = trainer.export(WORK_DIR / "student-final", extra={"step": result.steps})
    finally:
        trainer.close()
    if trainer.env.is_main:
        _write_outputs(params, result, final, digest, time.perf_counter() - t0, world=trainer.env.world_size)
    return 0


def _write_outputs(params: Params, result, final: Path, digest: str, wall: float, world: int) -> None:
    for src, dst in ((result.export_dir, STUDENT_DIR), (final, FINAL_DIR)):
        shutil.rmtree(dst, ignore_errors=True)
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(src, dst)  # the export (best or final) and the last-step student become stage outputs
    hist = result.history
    last = hist[-1] if hist else {}
    vals = [h["val/accuracy"] for h in hist if h.get("val/accuracy") is not None]
    mem = [h["mem/actor_update_delta_peak_GiB"] for h in hist if "mem/actor_update_delta_peak_GiB" in h]
    summary = {  # numbers only (dvc metrics show); the method and config digest go to RUN_RECORD and tags
        "steps": result.steps,
        "final_loss": last.get("loss/total"),
        "final_cosine": last.get("rep/cosine/mean"),
        "best_val_accuracy": result.best_score if result.best_step > 0 else None,
        "best_step": result.best_step,
        "final_val_accuracy": vals[-1] if vals else None,
        "response_length_mean": sum(h["response/length_mean"] for h in hist[-10:]) / max(1, len(hist[-10:])),
        "update_peak_GiB_max": max(mem) if mem else None,
        "step_seconds_median": sorted(h["perf/step_seconds"] for h in hist)[len(hist) // 2] if hist else None,
        "wall_seconds": wall,
        "world_size": world,
    }
    write_json(METRICS, {k: v for k, v in summary.items() if v is not None})
    write_json(
        RUN_RECORD,
        {
            "method": params.distill.method,
            "config_digest": digest,
            "val_protocol": params.distill.val.protocol,
        },
    )
    PLOTS.parent.mkdir(parents=True, exist_ok=True)
    with PLOTS.open("w") as f:
        f.write("step\t" + "\t".join(k.replace("/", "_") for k in PLOT_KEYS) + "\n")
        for h in hist:
            f.write(
                f"{h['step']}\t"
                + "\t".join("" if h.get(k) is None else f"{h[k]:.6g}" for k in PLOT_KEYS)
                + "\n"
            )
    write_curves(
        hist, CURVES, title=f"{params.distill.method}: {result.steps} steps", val=params.distill.val.protocol
    )
    # Checkpoints of a finished run are not needed any more (the student is in the DVC cache).
    shutil.rmtree(params.checkpoint.dir, ignore_errors=True)


def write_curves(history: list[dict], path: Path, title: str, val: str = "evaluate") -> None:
    """The distill curves as one PNG (what `dvc plots show` embeds; its vega charts need a CDN to render)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("loss/total", "loss", "log"),
        ("rep/cosine/mean", "student/teacher cosine (mean over layers)", "linear"),
        ("val/accuracy", f"validation accuracy ({val} protocol)", "linear"),
        ("response/length_mean", "mean response length (tokens)", "linear"),
        ("mem/actor_update_delta_peak_GiB", "update transient peak (GiB)", "linear"),
        ("perf/step_seconds", "step time (s)", "linear"),
    ]
    fig, axes = plt.subplots(2, 3, figsize=(13, 6.5), constrained_layout=True)
    for ax, (key, label, scale) in zip(axes.flat, panels, strict=True):
        pts = [(h["step"], h[key]) for h in history if h.get(key) is not None]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="." if len(pts) < 40 else None)
            if scale == "log" and all(v > 0 for _, v in pts):
                ax.set_yscale("log")
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def launch(params_path: str, overrides: list[str]) -> int:
    """Open the stage's MLflow run, run the worker here (1 process) or under torchrun (FSDP2), then log the
    distilled student as a LoggedModel and write the lineage ref."""
    params = load_params(params_path, overrides)
    par = params.parallel
    world = par.nproc_per_node * par.nnodes
    prompts = prompts_file(params)
    if params.rollout.engine == "vllm":  # one clear line here rather than a traceback per rank
        from transformers import AutoConfig

        from trainer.rollout_vllm import require_vllm

        require_vllm(
            AutoConfig.from_pretrained(params.models.student.path),
            "cuda" if torch.cuda.is_available() else "cpu",
        )
    if par.launcher == "ray":
        check_address(par)  # a wrong address is one line before the MLflow run opens
    prompts_sha = file_sha256(prompts)
    upstream, extra = (
        [UPSTREAM],
        provenance_tags(params.rollout, n=params.distill.n_responses, seed=params.distill.seed),
    )
    if params.distill.method == "oprd_bridge":  # the bank is an input: link its run and record its digest
        bridge = Path(params.distill.bridge.bank)
        upstream.append(bridge / "bridge.mlflow.json")
        summary = json.loads((bridge / "bridge.json").read_text())
        extra |= {"oprd.bridge.bank.sha256": summary["bank_sha256"], "oprd.bridge.rank": str(summary["rank"]),
                 "oprd.bridge.train_projector": str(params.distill.bridge.train_projector).lower()}  # fmt: skip
    bank = training_prompts(params, prompts)[1]  # the failure bank, when its training share is mixed in
    datasets = {"train_prompts": prompts_sha, **({BANK_DATASET: bank.digest} if bank else {})}
    with StageRun("distill", params, upstream=upstream, num_devices=world, extra_tags=extra,
                  datasets=datasets) as run:  # fmt: skip
        # What this run consumed, on its page: the training prompts (and failures) and the teacher and base.
        log_dataset(run.run_id, prompts, "train_prompts", "training", prompts_sha, client=run.client)
        if bank is not None:
            log_bank_input(run, bank)
        inputs = dict(run.upstream["rollout"].models) if "rollout" in run.upstream else {}
        log_model_inputs(run.run_id, list(inputs.values()), client=run.client)
        run.set_tags({"oprd.config_digest": config_digest(params)})
        if par.launcher == "ray":
            rc = _ray_job(run, params, params_path, overrides)
        elif world == 1:
            run.set_tags(_launch_tags(params, "in-process"))
            rc = worker(params_path, overrides, logger=run.metric_logger(flush_every=10))
        else:
            run.set_tags(_launch_tags(params, "torchrun"))
            args = ["--params", params_path, *(a for o in overrides for a in ("--set", o))]
            env = {**os.environ, "OMP_NUM_THREADS": str(params.optim.num_threads or 1),
                   RUN_ENV: run.run_id, URI_ENV: run.tracking_uri}  # fmt: skip
            rc = subprocess.call(
                [*torchrun_command(par, "pipelines.stage_distill"), "--worker", *args], env=env
            )
        if rc != 0:
            raise WorkerFailed(f"distillation workers exited with {rc} (their messages are above)")
        sign_student(params, STUDENT_DIR, datasets, _eval_suite_records(params), _commit())
        model_id = log_logged_model(
            "student", STUDENT_DIR, role="student", run_id=run.run_id, client=run.client,
            tags={"oprd.method": params.distill.method}, copy_max_mb=params.tracking.copy_weights_max_mb,
        )  # fmt: skip
        log_model_outputs(run.run_id, [model_id], client=run.client)
        summary = json.loads(METRICS.read_text())
        run.client.log_artifact(run.run_id, str(CURVES), "plots")
        run.log_metrics({f"final/{k}": v for k, v in summary.items() if isinstance(v, (int, float))})
        student_sha = json.loads((STUDENT_DIR / "manifest.json").read_text())["sha256"]
        bank_ref = {BANK_DATASET: bank.digest} if bank else {}  # -> the gate's dataset_digests
        run.write_ref(REF, {"student": student_sha, **bank_ref}, models={**inputs, "student": model_id})
    return 0


def _launch_tags(params: Params, launcher: str) -> dict[str, str]:
    par = params.parallel
    return {
        "oprd.parallel.launcher": launcher,
        "oprd.parallel.backend": (  # what init_distributed resolves ``auto`` to
            par.backend if par.backend != "auto" else ("nccl" if torch.cuda.is_available() else "gloo")
        ),
        "oprd.parallel.world_size": str(par.nproc_per_node * par.nnodes),
        "oprd.parallel.nnodes": str(par.nnodes),
        "oprd.parallel.nproc_per_node": str(par.nproc_per_node),
    }


def _ray_job(run: StageRun, params: Params, params_path: str, overrides: list[str]) -> int:
    """``parallel.launcher: ray``: every rank's :func:`worker` as a Ray Train job (:mod:`trainer.ray_job`); the
    run's tags record the cluster size and where each rank ran. Ray Train's own run state lives under
    ``checkpoint.dir/ray`` and is removed after a successful job."""
    job_dir = Path(params.checkpoint.dir) / "ray"
    name = f"distill-{run.run_id[:12]}"
    env = {
        RUN_ENV: run.run_id,
        URI_ENV: run.tracking_uri,
        "OMP_NUM_THREADS": str(params.optim.num_threads or 1),
    }
    job = run_ray_job(params.parallel, "pipelines.stage_distill:worker", [params_path, overrides],
                      job_dir=job_dir, name=name, env=env, teacher=params.teacher)  # fmt: skip
    run.set_tags(job.tags())
    shutil.rmtree(job_dir, ignore_errors=True)
    return 0


def _eval_suite_records(params: Params) -> dict[str, dict]:
    """``{suite: {"digest", "graders"}}`` of the configured eval suites, as the evaluate stage records them (the
    failure bank's regression suites are added by evaluate and are not part of the distillation plan)."""
    suites = [load_suite(s, params.evaluate.embedded_path) for s in params.evaluate.suites]
    return {s.name: suite_record(s) for s in suites}


def _commit() -> str:
    commit, dirty = git_state()
    return commit + ("+dirty" if dirty else "")


def main(argv: list[str] | None = None) -> int:
    def body(args) -> int:
        return worker(args.params, args.overrides) if args.worker else launch(args.params, args.overrides)

    def worker_flag(ap) -> None:
        ap.add_argument(
            "--worker", action="store_true", help="internal: run one rank (torchrun sets the env)"
        )

    try:
        return stage_cli(
            "DVC stage: on-policy distillation", body, argv,
            errors=(NonFiniteLossError, TrackingUnreachable, WorkerFailed, SigningKeyMissing, RayJobError),
            extra_args=worker_flag,
        )  # fmt: skip
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
