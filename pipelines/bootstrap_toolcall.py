"""The ``bootstrap_toolcall`` stage: the embedded tool-call task, its tokenizer, teacher and student base.

``python -m pipelines.bootstrap_toolcall --params params.yaml --out artifacts/toolcall`` writes::

    artifacts/toolcall/task/{train,val,eval}.jsonl   {"id", "prompt", "grader": "tool_call", "reference"}
                                                     (+ the gold "response" on train rows)
    artifacts/toolcall/models/teacher/               HF dir + manifest.json (best greedy val accuracy of the run)
    artifacts/toolcall/models/student-base/          HF dir + manifest.json (step ``task.toolcall
                                                     .student_base_step`` of the same run: shared lineage)
    artifacts/toolcall/bootstrap.json                val accuracies, steps, wall time, manifest sha256s

The recipe is the arithmetic bootstrap's (:mod:`pipelines.bootstrap`, whose model builder, lr schedule, SFT step
and record type it reuses): a tiny Qwen2 (``models.tiny_toolcall``) trained from scratch on CPU with
teacher-forced cross-entropy on response + EOS, on problems drawn fresh from the generator (never a val or eval
prompt), warm-up + cosine lr; greedy val accuracy (:func:`pipelines.task_toolcall.check_response`) every
``eval_every`` steps picks the teacher. Keys come from ``task.toolcall``, so applying ``profiles/toolcall.yaml``
leaves the arithmetic ``bootstrap`` stage's keys alone. Sequences are laid out as the rollout engine lays them out
(``<pad>``-left-padded ``<s>`` + prompt, masked; positions counted from the first real token). For one seed and
one thread count the saved weights are byte-identical across runs.

With ``models.embedded: false`` nothing is built.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen2ForCausalLM

from pipelines.bootstrap import (
    IGNORE_INDEX,
    BootstrapResult,
    TeacherRun,
    _lr_lambda,
    _sft_step,
    _snapshot,
    build_model,
)
from pipelines.task_toolcall import (
    MAX_NEW_TOKENS,
    ToolProblem,
    ToolSplits,
    build_tokenizer,
    check_response,
    iter_problems,
    make_splits,
)
from trainer.config import ConfigError, Params, load_params
from trainer.export import write_manifest
from trainer.rollout import left_pad

__all__ = ["GRADER", "greedy_accuracy", "main", "run_bootstrap_toolcall", "toolcall_params", "train_teacher"]

logger = logging.getLogger(__name__)

GRADER = "tool_call"
"""The ``pipelines.graders`` grader named by every row this stage writes."""


def toolcall_params(params: Params) -> Params:
    """``params`` with ``models.tiny_toolcall`` as ``models.tiny`` and ``task.toolcall``'s keys as ``task``'s, so
    :func:`pipelines.bootstrap.build_model` and the recipe read the tool-call values."""
    models = params.models.model_copy(update={"tiny": params.models.tiny_toolcall})
    task = params.task.model_copy(update=params.task.toolcall.model_dump())
    return params.model_copy(update={"models": models, "task": task})


# -------------------------------------------------------------------------------------------------- data
def write_splits(splits: ToolSplits, task_dir: Path) -> None:
    """Write ``{train,val,eval}.jsonl``: ids ``<split>-<index>``, the grader and its BFCL reference on every row,
    the gold response on train rows."""
    task_dir.mkdir(parents=True, exist_ok=True)
    for name in ("train", "val", "eval"):
        rows = []
        for i, p in enumerate(getattr(splits, name)):
            row: dict[str, object] = {"id": f"{name}-{i:05d}", "prompt": p.prompt}
            if name == "train":
                row["response"] = p.response
            row |= {"grader": GRADER, "reference": p.reference}
            rows.append(json.dumps(row))
        (task_dir / f"{name}.jsonl").write_text("\n".join(rows) + "\n")


def make_sft_batch(
    problems: list[ToolProblem], tokenizer: PreTrainedTokenizerFast
) -> dict[str, torch.Tensor]:
    """Teacher-forced batch: ``<pad>``* ``<s>`` prompt | response ``</s>`` ``<pad>``*, the rollout layout.

    Returns:
        ``input_ids``, ``attention_mask``, ``position_ids``, ``labels``: ``LongTensor [B, T]``; labels are
        ``-100`` except on response tokens and EOS; positions count from the first real token.
    """
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    prompt_ids, prompt_mask = left_pad([tokenizer(p.prompt)["input_ids"] for p in problems], pad)
    responses = [tokenizer(p.response, add_special_tokens=False)["input_ids"] + [eos] for p in problems]
    p_w, r_w = prompt_ids.shape[1], max(len(r) for r in responses)
    input_ids = torch.cat([prompt_ids, torch.full((len(problems), r_w), pad, dtype=torch.long)], dim=1)
    mask = torch.cat([prompt_mask, torch.zeros((len(problems), r_w), dtype=torch.long)], dim=1)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    for i, r in enumerate(responses):
        input_ids[i, p_w : p_w + len(r)] = torch.tensor(r)
        labels[i, p_w : p_w + len(r)] = torch.tensor(r)
        mask[i, p_w : p_w + len(r)] = 1
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": input_ids, "attention_mask": mask, "position_ids": position_ids, "labels": labels}


# ---------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def greedy_accuracy(
    model: Qwen2ForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    problems: list[ToolProblem],
    batch_size: int = 256,
) -> float:
    """Fraction of ``problems`` whose greedy completion (masked left padding) makes exactly the reference calls."""
    was_training = model.training
    model.eval()
    correct = 0
    for start in range(0, len(problems), batch_size):
        chunk = problems[start : start + batch_size]
        input_ids, mask = left_pad([tokenizer(p.prompt)["input_ids"] for p in chunk], tokenizer.pad_token_id)
        out = model.generate(
            input_ids=input_ids,
            attention_mask=mask,
            do_sample=False,
            max_new_tokens=MAX_NEW_TOKENS,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        texts = tokenizer.batch_decode(out[:, input_ids.shape[1] :], skip_special_tokens=True)
        correct += sum(check_response(t, p.reference)[0] for t, p in zip(texts, chunk, strict=True))
    model.train(was_training)
    return correct / len(problems)


# ------------------------------------------------------------------------------------------------ training
def train_teacher(
    params: Params, tokenizer: PreTrainedTokenizerFast, splits: ToolSplits, *, progress: bool = True
) -> TeacherRun:
    """Train the teacher from scratch; snapshot the student base at ``student_base_step`` on the way.

    ``params`` is :func:`toolcall_params`'s view. The rules are :func:`pipelines.bootstrap.train_teacher`'s: val
    accuracy every ``eval_every`` steps, at the student step and at the last step; the teacher is the best-val
    snapshot (ties go to the later step); the run stops early at ``teacher_target_acc`` once past the student step.
    """
    t = params.task
    torch.manual_seed(t.seed)
    model = build_model(params, tokenizer)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=t.teacher_lr, betas=(0.9, 0.98), weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, _lr_lambda(t.teacher_warmup_steps, t.teacher_steps, t.teacher_min_lr_ratio)
    )
    held_out = {p.prompt for p in splits.val} | {p.prompt for p in splits.eval}
    stream = iter_problems(t.seed * 7919 + 1, exclude=held_out)

    best: tuple[float, int, dict[str, torch.Tensor]] | None = None
    student: tuple[float, dict[str, torch.Tensor]] | None = None
    curve: dict[int, float] = {}
    bar = tqdm(range(1, t.teacher_steps + 1), desc="tool-call teacher SFT", unit="step", disable=not progress)
    step = 0
    for step in bar:
        loss = _sft_step(
            model, opt, sched, make_sft_batch([next(stream) for _ in range(t.teacher_batch_size)], tokenizer)
        )
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
    assert (
        best is not None and student is not None
    )  # student_base_step <= teacher_steps is checked by the caller
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
    """Save an HF directory (safetensors, config, tokenizer, generation config with this task's
    :data:`~pipelines.task_toolcall.MAX_NEW_TOKENS`) plus its manifest; returns the manifest sha256."""
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
    model.save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
    return str(write_manifest(directory)["sha256"])


def run_bootstrap_toolcall(
    params: Params, out: str | Path, *, progress: bool = True
) -> BootstrapResult | None:
    """Run the stage into ``out`` (``artifacts/toolcall`` in ``dvc.yaml``); ``None`` when not embedded.

    Raises:
        ConfigError: ``task.toolcall.student_base_step`` > ``task.toolcall.teacher_steps``.
    """
    if not params.models.embedded:
        logger.info("models.embedded is false; nothing to bootstrap")
        return None
    tc = params.task.toolcall
    if tc.student_base_step > tc.teacher_steps:
        raise ConfigError(
            f"task.toolcall.student_base_step ({tc.student_base_step}) must be <= "
            f"task.toolcall.teacher_steps ({tc.teacher_steps})"
        )
    prev_threads, prev_det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    if tc.num_threads:
        torch.set_num_threads(tc.num_threads)
    torch.use_deterministic_algorithms(True)
    try:
        return _build(toolcall_params(params), Path(out), progress=progress)
    finally:
        torch.set_num_threads(prev_threads)
        torch.use_deterministic_algorithms(prev_det)


def _build(params: Params, out: Path, *, progress: bool) -> BootstrapResult:
    t = params.task
    start = time.perf_counter()
    splits = make_splits(t.seed, t.num_train, t.num_val, t.num_eval)
    write_splits(splits, out / "task")
    tokenizer = build_tokenizer()
    run = train_teacher(params, tokenizer, splits, progress=progress)
    dirs = {"teacher": out / "models" / "teacher", "student_base": out / "models" / "student-base"}
    result = BootstrapResult(
        seed=t.seed,
        num_threads=torch.get_num_threads(),
        steps_run=run.steps_run,
        wall_time_s=0.0,
        teacher={
            "dir": str(dirs["teacher"]),
            "step": run.teacher_step,
            "val_acc": run.teacher_val_acc,
            "manifest_sha256": save_model_dir(params, tokenizer, run.teacher_state, dirs["teacher"]),
        },
        student_base={
            "dir": str(dirs["student_base"]),
            "step": run.student_step,
            "val_acc": run.student_val_acc,
            "manifest_sha256": save_model_dir(params, tokenizer, run.student_state, dirs["student_base"]),
        },
        val_curve=run.val_curve,
        splits={"train": len(splits.train), "val": len(splits.val), "eval": len(splits.eval)},
    )
    result.wall_time_s = round(time.perf_counter() - start, 2)
    (out / "bootstrap.json").write_text(json.dumps({"task": "toolcall", **asdict(result)}, indent=2) + "\n")
    return result


def main(argv: list[str] | None = None) -> int:
    """CLI: ``python -m pipelines.bootstrap_toolcall --params params.yaml --out artifacts/toolcall [-S k=v ...]``."""
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.bootstrap_toolcall", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument(
        "--out", default="artifacts/toolcall", help="output root (default: artifacts/toolcall)"
    )
    parser.add_argument(
        "-S", "--set", dest="overrides", action="append", default=[],
        help="dotted override, e.g. -S task.toolcall.teacher_steps=200 (repeatable)",
    )  # fmt: skip
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    try:
        params = load_params(args.params, args.overrides)
        result = run_bootstrap_toolcall(params, args.out, progress=not args.no_progress)
    except ConfigError as exc:
        print(f"bootstrap_toolcall: {exc}", file=sys.stderr)
        return 2
    if result is not None:
        logger.info(
            "teacher step %d val_acc %.3f | student-base step %d val_acc %.3f | %d steps in %.0f s",
            result.teacher["step"], result.teacher["val_acc"], result.student_base["step"],
            result.student_base["val_acc"], result.steps_run, result.wall_time_s,
        )  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
