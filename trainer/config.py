"""The one typed configuration tree of oprd-ci, loaded from ``params.yaml``.

Every default lives here. Every section rejects unknown keys (``extra="forbid"``) and every choice is a
``Literal``, so a typo in ``params.yaml`` fails at load time with the dotted key, what was given and what is
allowed, instead of silently running the default.

Sections and who reads them:

==============  =====================================================================================
``models``      trainer: teacher / student-base locations and load options
``task``        pipelines (bootstrap): the embedded synthetic task; ``prompts_file`` for real data
``rollout``     trainer: on-policy sampling (engine, temperature, lengths) and the pre-flight checks
``distill``     trainer: the objective (OPRD / OPD baselines / combined), steps and batch shape
``optim``       trainer: AdamW + warm-up/cosine schedule, clipping, precision
``parallel``    trainer: FSDP2 topology and launcher (torchrun or Ray)
``checkpoint``  trainer: DCP checkpoint cadence and retention
``teacher``     trainer: where the teacher runs (in-process, or a pool of Ray actor replicas)
``evaluate``    pipelines: sampling and suites for the evaluate stage
``tracking``    pipelines: MLflow location and cost accounting
``gate``        pipelines/server: registry location, model name and policy file
==============  =====================================================================================
"""

from __future__ import annotations

import difflib
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from trainer.methods import Method, method_spec

__all__ = [
    "BridgeConfig",
    "CheckpointConfig",
    "ConfigError",
    "DistillConfig",
    "EvalSuite",
    "EvaluateConfig",
    "FailuresConfig",
    "GateConfig",
    "ModelSource",
    "ModelsConfig",
    "OPDConfig",
    "OptimConfig",
    "ParallelConfig",
    "Params",
    "RepConfig",
    "RolloutConfig",
    "TaskConfig",
    "TeacherConfig",
    "TinyModelSpec",
    "ToolCallModelSpec",
    "ToolCallTaskConfig",
    "TrackingConfig",
    "VLLMConfig",
    "load_params",
    "params_from_tree",
]

LayerMode = Literal["last", "all", "even", "odd"]
PositionMode = Literal["last", "all", "last_k", "first_k"]
PosInt = Annotated[int, Field(gt=0)]
NonNegFloat = Annotated[float, Field(ge=0.0)]


class ConfigError(ValueError):
    """A configuration problem, phrased so the user knows which key to change and how."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


# --------------------------------------------------------------------------------------------------- models
class TinyModelSpec(_Section):
    """Architecture of a config-built Qwen2 model (the embedded default and the tests)."""

    hidden_size: PosInt = 128
    intermediate_size: PosInt = 512
    num_hidden_layers: PosInt = 4
    num_attention_heads: PosInt = 4
    num_key_value_heads: PosInt = 4
    max_position_embeddings: PosInt = 64
    rope_theta: float = 1.0e4
    tie_word_embeddings: bool = True


class ToolCallModelSpec(TinyModelSpec):
    """:class:`TinyModelSpec` with room for the tool-call task's sequences (a partial ``models.tiny_toolcall``
    keeps 128 positions instead of falling back to 64)."""

    max_position_embeddings: PosInt = 128


class ModelSource(_Section):
    """Where one model comes from: a local Hugging Face directory (safetensors only)."""

    path: str
    revision: str | None = None
    """Free-form identity recorded in lineage (e.g. the hub commit the directory was downloaded at)."""


class ModelsConfig(_Section):
    teacher: ModelSource = ModelSource(path="artifacts/models/teacher")
    student: ModelSource = ModelSource(path="artifacts/models/student-base")
    tokenizer: str | None = None
    """Tokenizer directory; ``None`` means the student's directory."""
    trust_remote_code: bool = False
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Storage dtype of the loaded weights (the trainer keeps fp32 masters for the student)."""
    embedded: bool = True
    """True: the bootstrap stage builds the tiny task, tokenizer, teacher and student base itself."""
    tiny: TinyModelSpec = TinyModelSpec()
    tiny_wide: TinyModelSpec = TinyModelSpec(
        hidden_size=160,
        intermediate_size=640,
        num_hidden_layers=6,
        num_attention_heads=5,
        num_key_value_heads=5,
    )
    """The embedded *wider and deeper* teacher (``bootstrap_wide`` stage, ``artifacts/models/teacher-wide``): the
    same task and tokenizer trained from scratch at another width and depth, so the student base and it differ in
    hidden size (128 vs 160) and depth (4 vs 6), the OPRD-Bridge setting (oprd-method.md §5)."""
    tiny_toolcall: ToolCallModelSpec = ToolCallModelSpec()
    """Architecture of the embedded tool-call pair (``bootstrap_toolcall`` stage, ``artifacts/toolcall/models``):
    ``models.tiny`` with room for the task's longest prompt (33 tokens) plus 64 new tokens."""


# ----------------------------------------------------------------------------------------------------- task
class ToolCallTaskConfig(_Section):
    """The embedded tool-call task (``pipelines.task_toolcall``) and its pair's from-scratch SFT run
    (``bootstrap_toolcall`` stage). The keys mean what the same keys of ``task`` mean for arithmetic; they are a
    section of their own so that selecting the task (``profiles/toolcall.yaml``) never changes a key the committed
    arithmetic ``bootstrap`` stage depends on."""

    seed: int = 0
    num_train: PosInt = 5000
    num_val: PosInt = 200
    num_eval: PosInt = 500
    teacher_steps: PosInt = 1500
    student_base_step: PosInt = 100
    teacher_lr: Annotated[float, Field(gt=0.0)] = 2.0e-3
    teacher_batch_size: PosInt = 32
    teacher_warmup_steps: int = Field(default=100, ge=0)
    teacher_min_lr_ratio: Annotated[float, Field(ge=0.0, le=1.0)] = 0.05
    teacher_target_acc: Annotated[float, Field(gt=0.0, le=1.0)] = 0.97
    eval_every: PosInt = 100
    num_threads: int = Field(default=1, ge=0)


class TaskConfig(_Section):
    """The embedded synthetic tasks: multi-step arithmetic with a worked chain and ``\\boxed{}`` (the default; the
    flat keys below) and tool calls (``toolcall``)."""

    name: Literal["arithmetic", "toolcall"] = "arithmetic"
    """Which embedded task the pipeline runs on: selects the validation split the distill stage reads
    (``artifacts/task`` or ``artifacts/toolcall/task``) and what ``precheck`` expects a bootstrap stage to write.
    Select ``toolcall`` with ``oprd-ci params apply profiles/toolcall.yaml``, which also points the model paths,
    prompts, eval suite and gate at the tool-call artifacts."""
    seed: int = 0
    num_train: PosInt = 5000
    num_val: PosInt = 200
    num_eval: PosInt = 500
    teacher_steps: PosInt = 2000
    """Length of the teacher run and of its cosine lr schedule (it may stop earlier, see ``teacher_target_acc``).
    Measured (seed 0, 1 thread): 2000 stops at step 1900 with 97.0% val / 95.4% eval greedy accuracy in 494 s on
    2 shared cores; 1500 ends at 89.5% val / 90.0% eval in 576 s (more contended)."""
    student_base_step: PosInt = 500
    """The student base is this early checkpoint of the teacher's own training run (shared lineage). The run has
    a grokking-like cliff; with ``teacher_steps: 2000`` greedy val accuracy is 1% at step 400, 25.5% at 500 (eval
    20%), 54.5% at 600: 500 is clearly weak but on the teacher's trajectory. The cliff moves with the schedule
    length (``teacher_steps: 1500``: 4% at 500, 16.5% at 600)."""
    prompts_file: str = "artifacts/task/train.jsonl"
    """Training prompts: a json/jsonl/parquet file with a ``prompt`` column (default: the embedded train split).
    Text prompts become one user turn; chat prompts (a list of messages, e.g. DAPO-Math-17k in verl's layout) are
    rendered whole with the student tokenizer's chat template (``trainer.data``)."""
    teacher_lr: Annotated[float, Field(gt=0.0)] = 2.0e-3
    """Peak AdamW learning rate of the teacher's from-scratch SFT (betas 0.9/0.98, wd 0.01, clip 1.0)."""
    teacher_batch_size: PosInt = 64
    """Sequences per teacher SFT step, drawn fresh from the problem generator (never val/eval prompts)."""
    teacher_warmup_steps: int = Field(default=100, ge=0)
    """Linear warm-up steps; then cosine decay over the rest of ``teacher_steps`` (a constant lr oscillates)."""
    teacher_min_lr_ratio: Annotated[float, Field(ge=0.0, le=1.0)] = 0.05
    """Final lr of the cosine schedule as a fraction of ``teacher_lr``."""
    teacher_target_acc: Annotated[float, Field(gt=0.0, le=1.0)] = 0.97
    """Stop the teacher run early once greedy val accuracy reaches this (only after ``student_base_step``)."""
    eval_every: PosInt = 100
    """Greedy val-accuracy evaluation every N teacher steps (the best one becomes the teacher)."""
    num_threads: int = Field(default=1, ge=0)
    """torch intra-op threads for the bootstrap (0 = torch's default). Weights are byte-identical for one seed
    and one thread count; 1 avoids OpenMP oversubscription on shared 2-core machines."""
    toolcall: ToolCallTaskConfig = ToolCallTaskConfig()


# -------------------------------------------------------------------------------------------------- rollout
class VLLMConfig(_Section):
    """Options of the vLLM rollout engine (``rollout.engine: vllm``, :mod:`trainer.rollout_vllm`). Sampling
    settings are not here: they come from ``rollout`` / ``distill`` exactly as for the HF engine."""

    multiprocessing: bool = True
    """True: vLLM's engine core and worker run in child processes (the production shape; weights travel as a
    safetensors file in ``/dev/shm``). False: the engine runs inside the trainer process (starts ~5x faster and
    syncs without a copy, but vLLM's CPU backend then pins the process to 1 torch thread)."""
    kv_cache_gib: Annotated[float, Field(gt=0.0)] = 1.0
    """CPU: KV-cache size per engine in GiB (vLLM's ``kv_cache_memory_bytes``)."""
    gpu_memory_utilization: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.3
    """CUDA: fraction of the GPU the engine may take (weights + KV cache); the trainer shares the device."""
    max_model_len: PosInt | None = None
    """Longest prompt + response the engine accepts; ``None`` = the model's ``max_position_embeddings``."""
    enforce_eager: bool = True
    """No CUDA graphs (CPU ignores graphs; on GPU set False for speed once the path is validated)."""
    sleep_mode: bool = True
    """CUDA only: free the engine's weights and KV cache during the update (``llm.sleep(level=1)``) and wake it
    for the next rollout. Ignored on CPU, which has no sleep mode."""


class RolloutConfig(_Section):
    engine: Literal["hf", "vllm"] = "hf"
    """``hf``: Hugging Face ``generate`` on the live student. ``vllm``: one colocated vLLM engine per rank, fed the
    student's full weights after every optimizer step (install it with ``bash scripts/setup.sh --vllm``)."""
    vllm: VLLMConfig = VLLMConfig()
    temperature: NonNegFloat = 1.0
    """Sampling temperature of the on-policy rollouts (0 = greedy, for deterministic tests)."""
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
    max_new_tokens: PosInt = 42
    num_prompts: PosInt = 64
    """Prompts used by the rollout stage for pre-flight statistics."""
    n_responses: PosInt = 1
    min_cosine: Annotated[float, Field(ge=-1.0, le=1.0)] = 0.3
    """Refuse vanilla OPRD when the mean per-layer student/teacher cosine on the student's own rollouts is below
    this (unrelated hidden bases: raw-MSE OPRD destroys the student)."""
    allow_unaligned: bool = False
    """Explicit override of the ``min_cosine`` refusal."""


# -------------------------------------------------------------------------------------------------- distill
class RepConfig(_Section):
    """Representation (hidden-state) loss, oprd-method.md section 2."""

    layers: LayerMode | list[PosInt] = "all"
    """``last | all | even | odd`` or explicit HF hidden-state indices (1..L; 0 = embeddings is never used)."""
    positions: PositionMode = "all"
    k: PosInt = 2000
    """Width for ``last_k`` / ``first_k``."""
    normalize: bool = False
    """False: raw MSE/d (paper Eq. 6, reference ``main``). True: L2-normalized vectors (``OPRD-Bridge`` HEAD)."""
    aggregation: Literal["token-mean", "seq-mean-token-mean"] = "token-mean"
    coef: NonNegFloat = 1.0
    """μ, the weight of the representation term (reference ``REP_DISTILLATION_COEF``): ``oprd`` minimizes
    ``coef · L_rep``, ``combined`` minimizes ``L_OPD + coef · L_rep`` (paper Eq. 7, oprd-method.md §2)."""


class OPDConfig(_Section):
    """Output-space baselines, oprd-method.md section 4."""

    top_k: PosInt = 16
    weight: Literal["student_p", "teacher_p", "none"] = "student_p"
    teacher_temperature: Annotated[float, Field(gt=0.0)] = 1.0
    kl_chunk_size: PosInt = 256
    """Tokens per chunk for the chunked full-vocabulary reverse KL."""

    @model_validator(mode="before")
    @classmethod
    def _merged_mu(cls, data: Any) -> Any:
        if isinstance(data, dict) and "mu" in data:
            raise ValueError(
                "distill.opd.mu was merged into distill.rep.coef (μ of the combined loss L_OPD + μ·L_rep, as the "
                "reference's REP_DISTILLATION_COEF); set distill.rep.coef instead"
            )
        return data


class BridgeConfig(_Section):
    """OPRD-Bridge (oprd-method.md §5.2-5.4): a teacher PCA basis and a student projector per mapped layer pair,
    fitted once by the ``bridge`` stage (the *bank*), then a normalized MSE between the two r-dim codes.

    The distill loss uses ``distill.rep`` for layers, positions, aggregation and ``coef``; it is always on
    L2-normalized codes (``rep.normalize`` does not apply)."""

    bank: str = "artifacts/bridge"
    """Directory of the fitted bank (written by the ``bridge`` stage, read by ``distill``)."""
    rank: PosInt = 8
    """r, the code dimension (paper: 8 cross-architecture, the peak of Fig. 12)."""
    projector: Literal["linear", "mlp"] = "linear"
    """P_S: ``linear`` = ``Linear(d_S, r, bias=False)``; ``mlp`` = ``d_S -> max(r, 4r) -> GELU -> r``."""
    num_prompts: PosInt = 256
    """Stage 0: training prompts the student answers once each (T = ``rollout.temperature``) for the fit."""
    max_pca_rows: PosInt = 16384
    """At most this many teacher response rows (sampled without replacement) per layer for the PCA."""
    val_fraction: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.1
    """Share of the pairs (whole responses, not rows) held out to select the projector checkpoint."""
    epochs: PosInt = 20
    lr: Annotated[float, Field(gt=0.0)] = 1.0e-3
    batch_rows: PosInt = 256
    """Rows (response tokens) per projector AdamW step."""
    seed: int = 42
    min_val_cosine: Annotated[float, Field(ge=-1.0, le=1.0)] = 0.5
    """Refuse a bank whose mean validation cosine cos(P_S h_S, z_T) is below this (pre-flight). Measured on the
    embedded pair: an unfitted projector gives |cos| <= 0.17 (mean over layers; <= 0.34 on one layer), every fitted
    bank >= 0.82 at ranks 1..64 (paper Fig. 12: <= 0.075 before, >= 0.72 after); 0.5 separates the two."""
    train_projector: bool = False
    """False (default, the paper): P_S is frozen during distillation. True: trained jointly with the student."""


class ValidationConfig(_Section):
    """How the distill stage scores checkpoints on the validation split to choose the exported one."""

    protocol: Literal["evaluate", "greedy"] = "evaluate"
    """``evaluate``: the evaluate stage's protocol on the val split (``evaluate.k`` samples per problem at
    ``evaluate.temperature`` / ``top_p``, Avg@k, a fixed sampling seed so every validation point sees the same
    stream); ``greedy``: one greedy response per problem (cheaper, but on 200 problems it picked a checkpoint
    9 points worse than the final one for a noisy output-space run: it measures another thing than evaluation)."""
    limit: int | None = Field(default=None, gt=0)
    """Use only the first N validation problems (``None`` = the whole split, ``task.num_val``)."""


class DistillConfig(_Section):
    method: Method = "oprd"
    steps: PosInt = 300
    prompts_per_step: PosInt = 16
    n_responses: PosInt = 4
    seed: int = 0
    rep: RepConfig = RepConfig()
    opd: OPDConfig = OPDConfig()
    bridge: BridgeConfig = BridgeConfig()
    eval_every: int = Field(default=25, ge=0)
    """Validation accuracy (``distill.val``) every N steps (0 = off); used to choose the exported checkpoint."""
    val: ValidationConfig = ValidationConfig()
    select_best: bool = True
    """Export the checkpoint with the best validation accuracy instead of the last one."""
    memory_every: int = Field(default=10, ge=0)
    """Measure the actor-update transient peak memory every N steps (0 = never); the CPU profiler costs time."""
    micro_batch_tokens: PosInt | None = None
    """Token budget of one micro-batch of the update (``None`` = the whole per-rank batch at once). Rows are packed
    so that a micro-batch's padded size (rows x (longest prompt + longest response)) stays within it; a row longer
    than the budget is a micro-batch of its own. Gradients accumulate; losses and metrics stay normalized by the
    step's global counts, so the result does not depend on the split (``trainer/microbatch.py``). The teacher and
    old-log-prob passes run per micro-batch too."""
    monitor_cosine: bool = False
    """Also capture the selected hidden states in methods whose loss does not use them, to log student/teacher
    cosines (costs memory and time; methods with a representation term always report them for free)."""


class OptimConfig(_Section):
    lr: Annotated[float, Field(gt=0.0)] = 1.0e-3
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: NonNegFloat = 0.01
    grad_clip: NonNegFloat = 1.0
    warmup_ratio: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0
    schedule: Literal["constant", "cosine"] = "constant"
    min_lr_ratio: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0
    fused: bool | None = None
    """``None``: fused AdamW where torch supports it for the parameters' device."""
    bf16: bool = False
    """bf16 compute with fp32 master weights. CUDA under FSDP2 (>1 rank): ``MixedPrecisionPolicy(param_dtype=bf16,
    reduce_dtype=fp32)``; otherwise (CPU, or a single process) ``torch.autocast``. Off by default: no speed-up on
    CPU."""
    activation_checkpointing: bool = False
    """Recompute each student decoder layer's activations in backward instead of storing them (Hugging Face's
    non-reentrant checkpointing, applied before FSDP2 wrapping): the update's activation memory drops from
    ~layers x tokens x (4 ff + 12 d) to ~layers x tokens x d, for one extra forward of compute."""
    num_threads: int = Field(default=0, ge=0)
    """torch intra-op threads per process (0 = leave torch's default)."""


class ParallelConfig(_Section):
    """The distill stage's worker group: ``nproc_per_node x nnodes`` ranks (the world size), launched by
    ``launcher``, talking over the torch process-group ``backend``."""

    nproc_per_node: PosInt = 1
    nnodes: PosInt = 1
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    """The torch process-group backend (as ``torch.distributed`` and Ray Train's ``TorchConfig`` name it);
    ``auto`` = NCCL on CUDA, gloo on CPU."""
    rdzv_endpoint: str | None = None
    launcher: Literal["torchrun", "ray"] = "torchrun"
    """Who starts the ranks: ``torchrun`` (one agent per node; c10d rendezvous at ``rdzv_endpoint`` when
    ``nnodes > 1``) or ``ray`` (a Ray Train ``TorchTrainer`` of ``nproc_per_node x nnodes`` workers on the cluster
    at ``ray_address``; :mod:`trainer.ray_job`). The trajectory is the same, so it is not part of the checkpoint
    digest."""
    ray_address: str | None = None
    """``launcher: ray`` only: the cluster to join (``host:port`` of a ``ray start --head`` GCS, ``auto``, or
    ``ray://host:10001``); ``None``: the cluster in ``RAY_ADDRESS`` (set inside a ``ray job submit`` job), else a
    local one-node cluster started for the run."""
    ray_max_failures: int = Field(default=1, ge=0)
    """``launcher: ray`` only: how many worker-group failures Ray Train recovers from (each restart resumes from
    the newest complete DCP checkpoint under ``checkpoint.dir``)."""


class TeacherConfig(_Section):
    """Where the teacher's no-grad pass runs (``trainer/teacher.py``, ``trainer/teacher_pool.py``).

    ``local`` (default): every rank loads the teacher in-process (FSDP2-sharded under torchrun), as before.
    ``ray``: ``replicas`` Ray actors each load the teacher once and answer "selected hidden states / log-probs of
    these token ids"; the ranks load only its config (for the pair check) and send each micro-batch's request as
    soon as their rollout is done. All ranks share one pool.
    """

    placement: Literal["local", "ray"] = "local"
    replicas: PosInt = 1
    num_cpus: Annotated[float, Field(gt=0.0)] = 1.0
    """Ray CPUs reserved per replica (also its torch intra-op thread count, rounded, at least 1)."""
    num_gpus: NonNegFloat = 0.0
    """Ray GPUs per replica (0 = the replica computes on CPU)."""
    ray_address: str | None = None
    """Address of a running Ray cluster (``ray.init(address=...)``); ``None``: join the cluster this process is
    already in (a Ray Train worker), else start a local one (single process), else rank 0 starts one and the
    other ranks join it."""
    max_retries: int = Field(default=3, ge=0)
    """Re-sends of one request after its replica died or timed out, before the step fails (weights untouched)."""
    max_restarts: int = Field(default=3, ge=0)
    """Ray restarts per replica (each reloads the teacher) after its process dies."""
    call_timeout_s: Annotated[float, Field(gt=0.0)] = 600.0
    """Seconds one request may take before it counts as failed and is re-sent."""


class CheckpointConfig(_Section):
    dir: str = "artifacts/checkpoints"
    every: int = Field(default=50, ge=0)
    """Save every N steps (0 = only at the end)."""
    keep_last: PosInt = 2
    resume: bool = True


# ------------------------------------------------------------------------------------------------- evaluate
class EvalSuite(_Section):
    name: str
    path: str | None = None
    """``None`` for the embedded held-out set; else a json/jsonl/parquet file with prompt/answer columns."""
    limit: int | None = Field(default=None, gt=0)
    grader: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=64)] = "math"
    """Grader (``pipelines.graders``) of the rows that name none; a row's own ``grader`` wins. The name is checked
    against the registered graders at ``precheck`` (graders live in ``pipelines``, not in the config)."""
    prompt_suffix: str | None = None
    """Appended to every prompt of this suite (unless already there). ``None``: ``evaluate.prompt_suffix`` for the
    ``math`` rows of a file suite, nothing for rows of other graders and for the embedded suite."""


class EvaluateConfig(_Section):
    k: PosInt = 4
    temperature: NonNegFloat = 0.7
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] = 0.95
    max_new_tokens: PosInt = 42
    batch_size: PosInt = 128
    seed: int = 1234
    """Seeds the global torch RNG before each suite (sampling) and the bootstrap CI."""
    suites: list[EvalSuite] = [EvalSuite(name="embedded")]
    embedded_path: str = "artifacts/task/eval.jsonl"
    """Held-out set used by a suite whose ``path`` is ``None`` (written by the bootstrap stage)."""
    prompt_suffix: str = " Please reason step by step, and put your final answer within \\boxed{}."
    """Appended to the ``math`` rows of file suites that do not already end with it (never to the embedded task,
    never to rows of other graders); ``""`` = off. ``evaluate.suites[].prompt_suffix`` overrides it per suite."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where evaluation runs; ``auto`` = CUDA when available."""
    engine: Literal["hf", "vllm"] = "hf"
    """``hf``: Hugging Face ``generate`` (the reference). ``vllm``: one vLLM engine per evaluated model, served from
    its directory, with the same sampling protocol (temperature, top_p, ``seed``), results layout and greedy
    outputs as ``hf`` (install it with ``bash scripts/setup.sh --vllm``)."""
    vllm: VLLMConfig = VLLMConfig(multiprocessing=False)
    """Options of the evaluation engines. In-process by default: evaluation never syncs weights, and an in-process
    engine starts several times faster than the multiprocessing one (``multiprocessing: true`` also works)."""
    roles: list[Literal["teacher", "student_base", "student", "student_final"]] = [
        "teacher", "student_base", "student", "student_final",
    ]  # fmt: skip
    """Models the evaluate stage scores: ``student`` is the exported (best-on-validation) student,
    ``student_final`` the last-step one. The gate needs ``student``; a methods grid drops the teacher and the
    student base after its first run (their numbers do not change)."""


# ------------------------------------------------------------------------------------------ tracking / gate
class TrackingConfig(_Section):
    """Where MLflow lives and how stages talk to it (read by ``pipelines.tracking``)."""

    uri: str | None = None
    """``None``: ``$MLFLOW_TRACKING_URI`` if set, else ``sqlite:///<project root>/mlflow.db``."""
    experiment: str = "oprd-ci"
    artifact_location: str | None = None
    """Artifact root given to a newly created experiment. ``None``: ``<dir of the sqlite db>/mlartifacts`` for
    sqlite stores (absolute, so stages started from any directory agree) and the server's default for HTTP."""
    price_per_device_hour: NonNegFloat = 0.05
    """USD per device-hour, for the cost estimate the gate budgets (a CPU core-hour by default)."""
    retries: int = Field(default=3, ge=0)
    """Extra attempts (with exponential backoff) before a tracking write is declared failed."""
    backoff_s: NonNegFloat = 1.0
    """First backoff between tracking retries; doubles on each further attempt."""
    timeout_s: Annotated[float, Field(gt=0.0)] = 5.0
    """HTTP timeout of one tracking request and of the reachability probe at stage start."""
    copy_weights_max_mb: NonNegFloat = 0.0
    """LoggedModels of directories larger than this log only ``config.json`` + ``manifest.json`` (by reference:
    the weights stay on disk at ``oprd.path``, identified by ``oprd.manifest_sha256``). 0 = always by reference."""


class GateConfig(_Section):
    model_name: str = "oprd-student"
    registry_url: str | None = None
    """``None``: ``$OPRD_REGISTRY_URL`` if set, else the registry app in-process on the local database."""
    policy: str = "policies/default.yaml"
    """The policy file this pipeline's gate runs under. It must equal the policy installed for ``model_name``
    (compared parsed, at ``precheck`` and at the gate); a model without a policy gets it installed."""
    alias: str = "champion"
    install_policy: bool = False
    """True: when ``policy`` differs from the installed policy, the gate installs it as the model's next policy
    version (audited, with ``policy_reason``) instead of refusing."""
    policy_reason: str | None = None
    """Why the policy changes (the audit log's reason); required with ``install_policy: true``."""
    store: str = "registry-store"
    """Where the gate freezes students (``<store>/<manifest sha256>/``), the copy the registry records and
    re-verifies; a queued experiment (``oprd-ci watch``) gets an absolute one, its temporary copy being deleted."""

    @model_validator(mode="after")
    def _reason_with_install(self) -> GateConfig:
        if self.install_policy and not (self.policy_reason or "").strip():
            raise ValueError(
                "gate.install_policy: true needs gate.policy_reason (why the policy changes; it goes to the "
                "audit log)"
            )
        return self


class FailuresConfig(_Section):
    """The failure bank (pipelines/failures.py, docs/tasks.md "The failure bank")."""

    bank: str = "failures/bank.jsonl"
    """The git-tracked bank file ``oprd-ci failures add`` writes; an empty or missing file = no failures."""
    regression_fraction: Annotated[float, Field(ge=0.0, le=1.0)] = 0.5
    """Share of new failures held out as regression suites (by hash of the normalized prompt, decided once at
    ingestion); the rest become training prompts."""
    train_ratio: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.25
    """Share of the distill stage's prompt pool taken by the bank's training failures (repeated as needed). No
    effect while the bank has no training failures; 0 turns mixing off."""


class WatchConfig(_Section):
    """Triggers (``oprd-ci watch``, docs/triggers.md): which events queue a distill-and-gate cycle of
    ``gate.model_name`` as a DVC experiment, and the identity of the trigger an experiment runs for."""

    teacher_model: str | None = None
    """MLflow registered-model name of the teacher to follow: its newest version becomes ``models.teacher.path``
    (the version's local directory) and ``models.teacher.revision`` (``models:/<name>/<version>``). None: off."""
    teacher_manifest: bool = True
    """A changed ``manifest.json`` sha256 under ``models.teacher.path`` queues a cycle."""
    failure_rows: int | None = Field(default=20, ge=1)
    """The failure bank grown by at least this many rows since the last cycle queues one. None: off."""
    policy_changes: bool = True
    """A new policy version of ``gate.model_name`` in the registry queues a cycle."""
    interval_s: Annotated[float, Field(gt=0)] = 60.0
    """Seconds between two passes of ``oprd-ci watch``."""
    start_worker: bool = True
    """After queueing, start a DVC queue worker (``dvc queue start -j 1``) so the cycle runs."""
    trigger_id: int | None = Field(default=None, ge=1)
    """Set by the watcher on its experiment (``-S``): the stages tag their MLflow runs with it and the gate links
    its decision to it. Leave null in params.yaml."""
    trigger_kind: Literal["teacher_version", "teacher_manifest", "failure_bank", "policy"] | None = None
    """Set with ``trigger_id``: what caused the cycle."""


# --------------------------------------------------------------------------------------------------- root
class SigningConfig(_Section):
    """Signing the exported student (docs/signing.md). The private key's path comes from ``$OPRD_SIGNING_KEY``
    (default ``~/.config/oprd-ci/keys/signing.pem``), never from here: params are logged to MLflow and git."""

    sign: bool = True
    """Sign ``artifacts/models/student`` with model-signing plus a distillation attestation at export; a missing
    key fails precheck. Whether the registry *requires* a signature is the policy's ``signing.required``."""


class Params(_Section):
    """The root of ``params.yaml``."""

    seed: int = 0
    models: ModelsConfig = ModelsConfig()
    task: TaskConfig = TaskConfig()
    rollout: RolloutConfig = RolloutConfig()
    distill: DistillConfig = DistillConfig()
    optim: OptimConfig = OptimConfig()
    parallel: ParallelConfig = ParallelConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    teacher: TeacherConfig = TeacherConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    tracking: TrackingConfig = TrackingConfig()
    gate: GateConfig = GateConfig()
    failures: FailuresConfig = FailuresConfig()
    signing: SigningConfig = SigningConfig()
    watch: WatchConfig = WatchConfig()

    @model_validator(mode="after")
    def _cross_checks(self) -> Params:
        rep = self.distill.rep
        if isinstance(rep.layers, list) and len(set(rep.layers)) != len(rep.layers):
            raise ValueError(f"distill.rep.layers has duplicates: {rep.layers}; list each HF index once")
        roles = self.evaluate.roles
        if not roles or len(set(roles)) != len(roles):
            raise ValueError(f"evaluate.roles must list each model once and not be empty, got {roles}")
        if method_spec(self.distill.method).top_k and self.distill.opd.top_k < 2:
            raise ValueError(
                "distill.opd.top_k must be >= 2 for opd_topk (use opd_sampled for a single token)"
            )
        if self.teacher.placement == "ray" and method_spec(self.distill.method).full_vocab:
            raise ValueError(
                "teacher.placement: ray does not serve full_kl (it needs the full [tokens, vocab] teacher "
                "distribution); use teacher.placement: local, or opd_topk / opd_sampled with a ray teacher"
            )
        return self


# --------------------------------------------------------------------------------------------------- load
def _allowed_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """Field names of the section at ``loc`` (for 'did you mean'); list items (int parts) use the item type."""
    cls: Any = model
    for part in loc[:-1]:
        if isinstance(part, int):
            args = typing.get_args(cls)
            cls = args[0] if args else None
        else:
            field = (
                cls.model_fields.get(part) if isinstance(cls, type) and issubclass(cls, BaseModel) else None
            )
            cls = field.annotation if field is not None else None
        if cls is None:
            return []
    return sorted(cls.model_fields) if isinstance(cls, type) and issubclass(cls, BaseModel) else []


def format_validation_error(err: ValidationError, source: str, model: type[BaseModel] = Params) -> str:
    """One line per problem: ``source: dotted.key: what is wrong (got X); allowed/hint``."""
    lines = []
    for e in err.errors():
        loc = tuple(e["loc"])
        key = ".".join(str(p) for p in loc) or "<root>"
        if e["type"] == "extra_forbidden":
            allowed = _allowed_keys(model, loc)
            guess = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
            hint = f"did you mean '{guess[0]}'? " if guess else ""
            lines.append(f"{source}: {key}: unknown key; {hint}allowed keys here: {', '.join(allowed)}")
        else:
            got = e.get("input")
            got_s = "" if isinstance(got, dict) else f" (got {got!r})"
            lines.append(f"{source}: {key}: {e['msg']}{got_s}")
    return "\n".join(lines)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node = tree
    parts = dotted.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: '{p}' is not a section")
    node[parts[-1]] = value


def load_params(
    path: str | Path | None = "params.yaml", overrides: dict[str, Any] | list[str] | None = None
) -> Params:
    """Load and validate ``params.yaml``.

    ``path=None`` (or a missing default ``params.yaml``) gives the built-in defaults. ``overrides`` are dotted keys,
    either a dict or ``["distill.method=opd_sampled", ...]`` with YAML-parsed values (as ``dvc exp run -S``).
    Raises :class:`ConfigError` with one readable line per problem.
    """
    tree: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        p = Path(path)
        if p.exists():
            source = str(p)
            try:
                loaded = yaml.safe_load(p.read_text()) or {}
            except yaml.YAMLError as exc:
                raise ConfigError(f"{p}: not valid YAML: {exc}") from exc
            if not isinstance(loaded, dict):
                raise ConfigError(
                    f"{p}: top level must be a mapping of sections, got {type(loaded).__name__}"
                )
            tree = loaded
        elif str(path) != "params.yaml":
            raise ConfigError(f"{p}: no such config file")
    if isinstance(overrides, list):
        parsed: dict[str, Any] = {}
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"override '{item}': expected KEY=VALUE, e.g. distill.method=opd_sampled")
            k, v = item.split("=", 1)
            parsed[k.strip()] = yaml.safe_load(v)
        overrides = parsed
    for k, v in (overrides or {}).items():
        _set_dotted(tree, k, v)
    return params_from_tree(tree, source)


def params_from_tree(tree: dict[str, Any], source: str = "<params>") -> Params:
    """Validate an already-parsed params tree (e.g. ``params.yaml`` with a profile merged in); raises
    :class:`ConfigError` with one ``source: dotted.key: problem`` line per problem."""
    try:
        return Params.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source)) from None
