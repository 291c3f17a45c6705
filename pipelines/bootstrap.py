"""The ``bootstrap`` stage: build the embedded default task, tokenizer, teacher and student base.

``python -m pipelines.bootstrap --params params.yaml --out artifacts`` writes::

    artifacts/task/{train,val,eval}.jsonl      {"id", "prompt", "answer"} (+ gold "response" on train rows)
    artifacts/models/teacher/                  HF dir + manifest.json (best greedy val accuracy of the run)
    artifacts/models/student-base/             HF dir + manifest.json (step ``task.student_base_step`` of the
                                               same run: shared lineage with the teacher)
    artifacts/bootstrap.json                   val accuracies, steps, wall time, manifest sha256s

The teacher is a tiny Qwen2 trained from scratch on CPU with teacher-forced cross-entropy on response + EOS,
on problems drawn fresh from the generator (never a val or eval prompt), with warm-up + cosine lr decay. Greedy
val accuracy every ``task.eval_every`` steps picks the teacher and can stop the run early. For one seed and one
thread count the saved weights are byte-identical across runs.

With ``models.embedded: false`` nothing is built: the stage checks that the named model directories and the
prompts file exist and exits.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from pipelines.task import (
    PROMPT_WIDTH,
    Problem,
    Splits,
    build_tokenizer,
    encode_prompts,
    grade,
    iter_problems,
)
from pipelines.task import make_splits as make_task_splits
from trainer.config import ConfigError, Params, load_params
from trainer.export import write_manifest

__all__ = ["BootstrapResult", "check_external_sources", "main", "run_bootstrap", "train_teacher"]

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100  # label value ignored by the HF causal-LM loss
MAX_NEW_TOKENS = 42  # longest gold response is 37 tokens + EOS; a little slack for wrong chains


@dataclass
class TeacherRun:
    """What one teacher SFT run produced (state dicts are detached CPU copies)."""

    teacher_state: dict[str, torch.Tensor]
    teacher_step: int
    teacher_val_acc: float
    student_state: dict[str, torch.Tensor]
    student_step: int
    student_val_acc: float
    steps_run: int
    val_curve: dict[int, float] = field(default_factory=dict)


@dataclass
class BootstrapResult:
    """The content of ``bootstrap.json``."""

    seed: int
    num_threads: int
    steps_run: int
    wall_time_s: float
    teacher: dict[str, object]
    student_base: dict[str, object]
    val_curve: dict[int, float]
    splits: dict[str, int]


# -------------------------------------------------------------------------------------------------- data
def write_splits(splits: Splits, task_dir: Path) -> None:
    """Write ``{train,val,eval}.jsonl``; ids are ``<split>-<index>``; train rows also carry the gold response."""
    task_dir.mkdir(parents=True, exist_ok=True)
    for name in ("train", "val", "eval"):
        rows = []
        for i, p in enumerate(getattr(splits, name)):
            row = {"id": f"{name}-{i:05d}", "prompt": p.prompt, "answer": str(p.answer)}
            if name == "train":
                row["response"] = p.response
            rows.append(json.dumps(row))
        (task_dir / f"{name}.jsonl").write_text("\n".join(rows) + "\n")


def make_sft_batch(
    problems: list[Problem], tokenizer: PreTrainedTokenizerFast, rng: random.Random
) -> dict[str, torch.Tensor]:
    """Teacher-forced batch: ``<pad>``* | ``<s>``*k prompt | response ``</s>`` | ``<pad>``*.

    Each prompt gets ``k`` leading ``<s>`` with ``k`` uniform in ``[1, PROMPT_WIDTH - len(prompt)]`` so both the
    plain ``tokenizer(prompt)`` encoding (k=1, masked padding) and fixed-width ``<s>`` left padding are seen.
    The batch is trimmed to its own longest row.

    Returns:
        ``input_ids``, ``attention_mask``, ``position_ids``, ``labels``: ``LongTensor [B, T]``; labels are
        ``-100`` except on response tokens and EOS; positions count from the first real token.
    """
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    prompts = [tokenizer(p.prompt, add_special_tokens=False)["input_ids"] for p in problems]
    responses = [tokenizer(p.response, add_special_tokens=False)["input_ids"] + [eos] for p in problems]
    prompts = [[bos] * rng.randint(1, PROMPT_WIDTH - len(x)) + x for x in prompts]
    p_w = max(len(x) for x in prompts)
    t_w = p_w + max(len(r) for r in responses)
    input_ids = torch.full((len(problems), t_w), pad, dtype=torch.long)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    mask = torch.zeros_like(input_ids)
    for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        input_ids[i, p_w - len(p) : p_w + len(r)] = torch.tensor(p + r)
        labels[i, p_w : p_w + len(r)] = torch.tensor(r)
        mask[i, p_w - len(p) : p_w + len(r)] = 1
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": input_ids, "attention_mask": mask, "position_ids": position_ids, "labels": labels}


# ---------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def greedy_accuracy(
    model: Qwen2ForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    problems: list[Problem],
    batch_size: int = 256,
) -> float:
    """Fraction of ``problems`` whose greedy completion (``<pad>``-left-padded, masked prompt) grades correct."""
    was_training = model.training
    model.eval()
    correct = 0
    for start in range(0, len(problems), batch_size):
        chunk = problems[start : start + batch_size]
        input_ids, mask = encode_prompts(tokenizer, [p.prompt for p in chunk])
        out = model.generate(
            input_ids=input_ids,
            attention_mask=mask,
            do_sample=False,
            max_new_tokens=MAX_NEW_TOKENS,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        texts = tokenizer.batch_decode(out[:, input_ids.shape[1] :], skip_special_tokens=True)
        correct += sum(grade(t, p.answer) for t, p in zip(texts, chunk, strict=True))
    model.train(was_training)
    return correct / len(problems)


# ------------------------------------------------------------------------------------------------ training
def build_model(params: Params, tokenizer: PreTrainedTokenizerFast) -> Qwen2ForCausalLM:
    """A freshly initialized Qwen2 of shape ``models.tiny`` over the task vocabulary (seeded by the caller)."""
    spec = params.models.tiny
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        max_position_embeddings=spec.max_position_embeddings,
        rope_theta=spec.rope_theta,
        tie_word_embeddings=spec.tie_word_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config._attn_implementation = "sdpa"
    return Qwen2ForCausalLM(config)


def _lr_lambda(warmup: int, total: int, min_ratio: float) -> Callable[[int], float]:
    """Linear warm-up to 1, then cosine decay to ``min_ratio`` at ``total`` (a multiplier of the peak lr)."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _sft_step(
    model: Qwen2ForCausalLM,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler,
    batch: dict[str, torch.Tensor],
) -> float:
    """One teacher-forced CE step (mean over response+EOS tokens), grad-norm clipped at 1.0; returns the loss."""
    loss = model(**batch).loss
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    sched.step()
    return loss.item()


def train_teacher(
    params: Params, tokenizer: PreTrainedTokenizerFast, splits: Splits, *, progress: bool = True
) -> TeacherRun:
    """Train the teacher from scratch; snapshot the student base at ``task.student_base_step`` on the way.

    Val accuracy (greedy, ``splits.val``) is measured every ``task.eval_every`` steps, at the student step and
    at the last step. The teacher is the best-val snapshot (ties go to the later step). The run stops early when
    val accuracy reaches ``task.teacher_target_acc`` at or after the student step.
    """
    t = params.task
    torch.manual_seed(t.seed)
    model = build_model(params, tokenizer)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=t.teacher_lr, betas=(0.9, 0.98), weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, _lr_lambda(t.teacher_warmup_steps, t.teacher_steps, t.teacher_min_lr_ratio)
    )
    # SFT problems: a stream disjoint from val/eval; its own seed so the splits do not shift it.
    held_out = {p.prompt for p in splits.val} | {p.prompt for p in splits.eval}
    stream = iter_problems(t.seed * 7919 + 1, exclude=held_out)
    pad_rng = random.Random(t.seed * 7919 + 2)

    best: tuple[float, int, dict[str, torch.Tensor]] | None = None
    student: tuple[float, dict[str, torch.Tensor]] | None = None
    curve: dict[int, float] = {}
    bar = tqdm(range(1, t.teacher_steps + 1), desc="teacher SFT", unit="step", disable=not progress)
    step = 0
    for step in bar:
        batch = make_sft_batch([next(stream) for _ in range(t.teacher_batch_size)], tokenizer, pad_rng)
        loss = _sft_step(model, opt, sched, batch)
        is_student = step == t.student_base_step
        if not (is_student or step % t.eval_every == 0 or step == t.teacher_steps):
            bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
            continue
        acc = greedy_accuracy(model, tokenizer, splits.val)
        curve[step] = acc
        bar.set_postfix(loss=f"{loss:.3f}", val_acc=f"{acc:.3f}")
        if is_student:
            student = (acc, _snapshot(model))
        if best is None or acc >= best[0]:
            best = (acc, step, _snapshot(model))
        if step >= t.student_base_step and acc >= t.teacher_target_acc:
            logger.info(
                "val accuracy %.3f >= target %.3f at step %d; stopping", acc, t.teacher_target_acc, step
            )
            break
    bar.close()
    # The caller checks student_base_step <= teacher_steps, and the student step always evaluates.
    assert best is not None and student is not None
    return TeacherRun(
        teacher_state=best[2],
        teacher_step=best[1],
        teacher_val_acc=best[0],
        student_state=student[1],
        student_step=t.student_base_step,
        student_val_acc=student[0],
        steps_run=step,
        val_curve=curve,
    )


# --------------------------------------------------------------------------------------------------- export
def save_model_dir(
    params: Params, tokenizer: PreTrainedTokenizerFast, state: dict[str, torch.Tensor], directory: Path
) -> str:
    """Save an HF directory (safetensors weights, config, tokenizer, generation config) plus its manifest.

    Returns:
        The manifest sha256.
    """
    model = build_model(params, tokenizer)
    model.load_state_dict(state)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        max_new_tokens=MAX_NEW_TOKENS,
    )
    directory.mkdir(parents=True, exist_ok=True)
    for old in directory.iterdir():  # a stale file from an earlier layout would enter the manifest
        if old.is_file():
            old.unlink()
    model.save_pretrained(str(directory))  # transformers 5 always writes model.safetensors
    tokenizer.save_pretrained(str(directory))
    return str(write_manifest(directory)["sha256"])


def check_external_sources(params: Params) -> None:
    """For ``models.embedded: false``: the named model directories and prompts file must exist.

    Raises:
        ConfigError: something named in ``params.yaml`` is missing.
    """
    problems = []
    for key, src in (
        ("models.teacher.path", params.models.teacher),
        ("models.student.path", params.models.student),
    ):
        if not (Path(src.path) / "config.json").is_file():
            problems.append(f"{key}: {src.path!r} is not a Hugging Face model directory (no config.json)")
    tok = params.models.tokenizer
    if tok is not None and not Path(tok).is_dir():
        problems.append(f"models.tokenizer: {tok!r} is not a directory")
    prompts = params.task.prompts_file
    if prompts is None or not Path(prompts).is_file():
        problems.append(f"task.prompts_file: {prompts!r} is not a file (training prompts are required)")
    if problems:
        raise ConfigError("models.embedded is false, but:\n" + "\n".join(problems))


def run_bootstrap(params: Params, out: str | Path, *, progress: bool = True) -> BootstrapResult | None:
    """Run the stage into ``out``; returns None (building nothing) when ``models.embedded`` is false.

    Raises:
        ConfigError: inconsistent task sizes/steps, or missing external sources.
    """
    if not params.models.embedded:
        check_external_sources(params)
        logger.info("models.embedded is false and all named sources exist; nothing to bootstrap")
        return None
    t = params.task
    if t.student_base_step > t.teacher_steps:
        raise ConfigError(
            f"task.student_base_step ({t.student_base_step}) must be <= task.teacher_steps ({t.teacher_steps})"
        )
    prev_threads, prev_det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    if t.num_threads:
        torch.set_num_threads(t.num_threads)
    # CPU kernels are deterministic for a fixed thread count; this turns a nondeterministic kernel into an error.
    torch.use_deterministic_algorithms(True)
    try:
        return _build_embedded(params, Path(out), progress=progress)
    finally:
        torch.set_num_threads(prev_threads)
        torch.use_deterministic_algorithms(prev_det)


def _build_embedded(params: Params, out: Path, *, progress: bool) -> BootstrapResult:
    t = params.task
    start = time.perf_counter()
    splits = make_task_splits(t.seed, t.num_train, t.num_val, t.num_eval)
    write_splits(splits, out / "task")
    tokenizer = build_tokenizer()

    run = train_teacher(params, tokenizer, splits, progress=progress)
    teacher_sha = save_model_dir(params, tokenizer, run.teacher_state, out / "models" / "teacher")
    student_sha = save_model_dir(params, tokenizer, run.student_state, out / "models" / "student-base")
    result = BootstrapResult(
        seed=t.seed,
        num_threads=torch.get_num_threads(),
        steps_run=run.steps_run,
        wall_time_s=round(time.perf_counter() - start, 2),
        teacher={
            "dir": str(out / "models" / "teacher"),
            "step": run.teacher_step,
            "val_acc": run.teacher_val_acc,
            "manifest_sha256": teacher_sha,
        },
        student_base={
            "dir": str(out / "models" / "student-base"),
            "step": run.student_step,
            "val_acc": run.student_val_acc,
            "manifest_sha256": student_sha,
        },
        val_curve=run.val_curve,
        splits={"train": len(splits.train), "val": len(splits.val), "eval": len(splits.eval)},
    )
    (out / "bootstrap.json").write_text(json.dumps(asdict(result), indent=2) + "\n")
    return result


def main(argv: list[str] | None = None) -> int:
    """CLI: ``python -m pipelines.bootstrap --params params.yaml --out artifacts [-S key=value ...]``."""
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.bootstrap", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument("--out", default="artifacts", help="output root (default: artifacts)")
    parser.add_argument(
        "-S",
        "--set",
        dest="overrides",
        action="append",
        default=[],
        help="dotted override, e.g. -S task.teacher_steps=200 (repeatable)",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)
    # Configure this stage's logger only: root-level basicConfig would also turn on every library's INFO logs
    # (httpx, mlflow) for the rest of the process when main() is called in-process.
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    try:
        params = load_params(args.params, args.overrides)
        result = run_bootstrap(params, args.out, progress=not args.no_progress)
    except ConfigError as exc:
        print(f"bootstrap: {exc}", file=sys.stderr)
        return 2
    if result is not None:
        logger.info(
            "teacher step %d val_acc %.3f | student-base step %d val_acc %.3f | %d steps in %.0f s",
            result.teacher["step"],
            result.teacher["val_acc"],
            result.student_base["step"],
            result.student_base["val_acc"],
            result.steps_run,
            result.wall_time_s,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
