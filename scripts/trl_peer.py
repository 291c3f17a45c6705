"""The peer row of the methods comparison: TRL's ``DistillationTrainer`` on oprd-ci's pair, prompts and budget.

    PYTHONPATH=. python scripts/trl_peer.py --params params.yaml   # lr: full_kl's best_lr in the grid spec

What is held equal to the grid's cells (``benchmarks/methods/grid.yaml``):

* the pair: ``models.teacher.path`` / ``models.student.path`` loaded with ``AutoModelForCausalLM`` (fp32), the
  tokenizer with ``trainer.models.load_tokenizer`` and passed explicitly as ``processing_class`` (stock
  ``AutoTokenizer`` may swap in a model-type class that does not round-trip the embedded task's text);
* the prompts and their order: the project's :class:`trainer.data.PromptSampler` with ``distill.seed`` picks
  ``distill.prompts_per_step`` prompts per step; each is repeated ``distill.n_responses`` times in a row and the
  dataset is not shuffled, so one TRL step of ``per_device_train_batch_size = prompts x responses`` sees the same
  16 prompts x 4 on-policy samples as an oprd-ci step;
* the budget: ``distill.steps`` optimizer steps, ``rollout.max_new_tokens`` new tokens at ``rollout.temperature``
  / ``top_p``; AdamW with ``optim.betas``, ``optim.weight_decay``, clip ``optim.grad_clip``, constant lr.

TRL's objective: the generalized JSD over the full vocabulary on the student's own samples, back-propagated
directly (no policy gradient). ``--beta 1.0`` (TRL's default, documented as "the reverse KL divergence") is the
on-policy reverse-KL setting, i.e. the same divergence as oprd-ci's ``full_kl`` baseline; the learning rate
defaults to that baseline's ``best_lr`` in the grid spec (``--spec``), and the row is written to
``peer_trl_lr<rate>.json`` next to it, so a run at another rate never overwrites a recorded row (docs/results.md also
reports 1e-4, the rate the first grid ran its seeds at: ``peer_trl.json``). TRL has no validation-based checkpoint selection here: the exported
student is the last step's, scored by the project's evaluate code (``pipelines.evaluation.evaluate_model``) with
``params.evaluate`` (same k, temperature, top-p, seed and problems as the evaluate stage).

Writes the student to ``--student-dir`` (HF safetensors + the project's tokenizer + sha256 manifest) and a JSON row
(``--out``) that ``oprd-ci grid collect --peer`` adds to the methods table.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import time
from pathlib import Path

import torch


def build_prompts(params, prompts: list[str]) -> list[str]:
    """The training stream: ``steps x prompts_per_step`` prompts in PromptSampler order, each ``n_responses`` times."""
    from trainer.data import PromptSampler

    d = params.distill
    sampler = PromptSampler(len(prompts), d.seed)
    epoch = cursor = 0
    out: list[str] = []
    for _ in range(d.steps):
        idx, epoch, cursor = sampler.take(epoch, cursor, d.prompts_per_step)
        out += [prompts[i] for i in idx for _ in range(d.n_responses)]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--spec", type=Path, default=Path("benchmarks/methods/grid.yaml"), help="the grid spec")
    ap.add_argument("--lr", type=float, default=None, help="AdamW lr (default: full_kl's best_lr in --spec)")
    ap.add_argument("--beta", type=float, default=1.0, help="TRL generalized-JSD beta (1.0 = reverse KL)")
    ap.add_argument("--student-dir", type=Path, default=Path("artifacts/peer/trl-student"))
    ap.add_argument("--out", type=Path, default=None, help="default: peer_trl_lr<lr>.json next to --spec")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    if args.lr is None:
        from pipelines.grid import load_spec
        from trainer.config import ConfigError

        try:
            args.lr = load_spec(args.spec).methods["full_kl"].best_lr
        except (ConfigError, KeyError) as exc:
            print(f"error: no --lr and no full_kl best_lr in {args.spec}: {exc}", file=sys.stderr)
            return 2
    if args.out is None:  # 3e-4 -> peer_trl_lr3e-4.json (the committed rows' names)
        args.out = args.spec.parent / f"peer_trl_lr{args.lr:.0e}.json".replace("e-0", "e-")

    import transformers
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import DistillationConfig, DistillationTrainer

    from pipelines.evaluation import evaluate_model
    from pipelines.stage_io import prompts_file
    from trainer.config import ConfigError, load_params
    from trainer.data import load_prompts
    from trainer.export import write_manifest
    from trainer.models import load_tokenizer

    try:
        params = load_params(args.params, args.overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    d, r, o, m = params.distill, params.rollout, params.optim, params.models
    tokenizer = load_tokenizer(m.tokenizer or m.student.path, m)
    student = AutoModelForCausalLM.from_pretrained(m.student.path, dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(m.teacher.path, dtype=torch.float32)
    stream = build_prompts(params, load_prompts(prompts_file(params)))
    work = args.student_dir.with_name(args.student_dir.name + ".work")
    cfg = DistillationConfig(
        output_dir=str(work), use_cpu=True, bf16=False, gradient_checkpointing=False, report_to="none",
        learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=o.weight_decay,
        adam_beta1=o.betas[0], adam_beta2=o.betas[1], max_grad_norm=o.grad_clip, max_steps=d.steps,
        per_device_train_batch_size=d.prompts_per_step * d.n_responses, gradient_accumulation_steps=1,
        max_completion_length=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p, beta=args.beta,
        shuffle_dataset=False, seed=d.seed, logging_steps=25, save_strategy="no", disable_dropout=True,
    )  # fmt: skip
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, args=cfg, train_dataset=Dataset.from_dict({"prompt": stream}),
        processing_class=tokenizer,
    )  # fmt: skip
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    shutil.rmtree(args.student_dir, ignore_errors=True)
    args.student_dir.parent.mkdir(parents=True, exist_ok=True)
    trainer.model.save_pretrained(args.student_dir, safe_serialization=True)
    tokenizer.save_pretrained(args.student_dir)
    write_manifest(args.student_dir)
    shutil.rmtree(work, ignore_errors=True)
    history = [h for h in trainer.state.log_history if "loss" in h]

    summary, _ = evaluate_model(
        args.student_dir, params.evaluate.suites, params.evaluate, "student", progress=False
    )
    row = {
        "name": f"TRL DistillationTrainer (beta={args.beta:g})",
        "lr": args.lr,
        "beta": args.beta,
        "seed": d.seed,
        "steps": trainer.state.global_step,
        "batch": {
            "prompts_per_step": d.prompts_per_step,
            "n_responses": d.n_responses,
            "max_new_tokens": r.max_new_tokens,
            "temperature": r.temperature,
        },
        "wall_seconds": wall,
        "loss_curve": [{"step": h["step"], "loss": h["loss"]} for h in history],
        "eval": summary["embedded"] if "embedded" in summary else next(iter(summary.values())),
        "student_dir": str(args.student_dir),
        "versions": {
            "trl": trl.__version__,
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "command": " ".join(["python", "scripts/trl_peer.py", *(argv if argv is not None else sys.argv[1:])]),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(row, indent=2) + "\n")
    e = row["eval"]
    print(f"TRL peer: Avg@{e['k']} {100 * e['avg_at_k']:.1f}% [{100 * e['avg_at_k_ci95'][0]:.1f}, "
          f"{100 * e['avg_at_k_ci95'][1]:.1f}] in {wall:.0f} s of training -> {args.out}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
