"""A small real-architecture teacher/student pair built from a verl-layout prompt set (the scale-out path on CPU).

``python -m pipelines.make_pair --prompts data/dapo-math-17k.parquet --out models/dapo-pair`` writes::

    <out>/teacher/        Qwen2 (tied embeddings), safetensors + byte-level BPE tokenizer + chat template
    <out>/student/        an earlier checkpoint of the same training run (shared lineage, like the paper's pair)
    <out>/pair.json       the build: sizes, steps, held-out loss of both models, wall time, manifest sha256s

Both are ordinary Hugging Face directories: stock ``AutoTokenizer.from_pretrained(dir)`` and
``AutoModelForCausalLM.from_pretrained(dir)`` load them, so pointing ``models.teacher.path`` /
``models.student.path`` at them (``models.embedded: false``) exercises exactly the path a 1.5B pair takes.

How it is built (deterministic: same inputs, seed and thread count give byte-identical directories):

* **Tokenizer.** ``tokenizers`` BPE trained on the first ``--tokenizer-rows`` prompts, with Qwen2's pre-tokenizer
  (its split regex, then byte-level without prefix space), NFC normalization and the byte-level decoder, so any
  text round-trips. Special tokens as in Qwen: ``<|endoftext|>`` (pad), ``<|im_start|>``, ``<|im_end|>`` (EOS);
  a ChatML chat template. ``tokenizer_config.json`` declares ``Qwen2Tokenizer``, the class transformers 5 picks
  for a ``qwen2`` config anyway; because the tokenizer *is* Qwen2's pipeline over a new vocabulary, that class
  encodes exactly like the trained ``tokenizer.json`` (tested), so stock loading gives the right ids.
* **Training data.** Each row's chat prompt (the DAPO ``prompt`` messages, chat template applied) followed by the
  assistant turn ``Answer: \\boxed{<reward_model.ground_truth>}<|im_end|>``; rows longer than ``--seq-len`` tokens
  are left out of training; the last ``--val-rows`` usable rows are held out for the loss report.
* **Run.** Causal-LM cross-entropy on all real tokens, AdamW, linear warm-up + cosine decay, ``--steps`` steps of
  ``--batch-size`` rows. The teacher is the last step, the student base the snapshot at ``--student-step``.

Sizes are tiny by default (hidden 128, 4 layers, vocabulary 4,096: ~1.3M parameters, about a minute on 1 CPU
thread); the teacher is a better language model of the prompts than the student, not a math solver.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from trainer.data import load_prompts
from trainer.export import write_manifest

__all__ = ["CHAT_TEMPLATE", "PairSpec", "build_pair", "build_tokenizer", "main", "save_pair_dir"]

PAD, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (PAD, IM_START, IM_END)
QWEN2_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
"""Qwen2's pre-tokenizer split pattern (digits are split one by one)."""
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
"""ChatML, as Qwen2 uses it (without Qwen's default system prompt)."""
IGNORE_INDEX = -100


@dataclass(frozen=True)
class PairSpec:
    """Everything that determines the pair (recorded in ``pair.json``)."""

    vocab_size: int = 4096
    tokenizer_rows: int = 4000
    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 1024
    seq_len: int = 256
    train_rows: int = 4000
    val_rows: int = 64
    steps: int = 120
    student_step: int = 30
    batch_size: int = 8
    lr: float = 3.0e-3
    warmup_steps: int = 10
    seed: int = 0
    num_threads: int = 1


# ------------------------------------------------------------------------------------------------ tokenizer
def build_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer over ``texts`` with Qwen2's pre-tokenization, specials and a ChatML template."""
    tk = Tokenizer(models.BPE())
    tk.normalizer = normalizers.NFC()
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, eos_token=IM_END, pad_token=PAD, chat_template=CHAT_TEMPLATE
    )


def _user_text(messages: str | list[dict[str, str]]) -> str:
    return messages if isinstance(messages, str) else "\n".join(m["content"] for m in messages)


def _messages(prompt: str | list[dict[str, str]]) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def _answers(path: Path) -> list[str]:
    """``reward_model.ground_truth`` (verl layout) or ``answer`` per row; ``""`` where a row has none."""
    import pyarrow.parquet as pq  # the pair is built from a parquet prompt set (verl layout)

    out = []
    for row in pq.read_table(path).to_pylist():
        rm = row.get("reward_model")
        gt = rm.get("ground_truth") if isinstance(rm, dict) else row.get("answer")
        out.append("" if gt is None else str(gt).strip())
    return out


# ------------------------------------------------------------------------------------------------- training
def _config(spec: PairSpec, tok: PreTrainedTokenizerFast) -> Qwen2Config:
    eos, pad = tok.convert_tokens_to_ids(IM_END), tok.convert_tokens_to_ids(PAD)
    config = Qwen2Config(
        vocab_size=len(tok),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=eos,
        pad_token_id=pad,
    )
    config._attn_implementation = "sdpa"
    return config


def _batch(rows: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``/``attention_mask``/``labels`` ``[B, T]`` (labels -100 on padding)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, IGNORE_INDEX)}


@torch.no_grad()
def _mean_nll(model: Qwen2ForCausalLM, rows: list[list[int]], pad_id: int) -> float:
    """Token-mean cross-entropy (nats) of ``model`` over ``rows``."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(rows), 16):
        b = _batch(rows[start : start + 16], pad_id)
        n = int((b["labels"][:, 1:] != IGNORE_INDEX).sum())
        total += model(**b).loss.item() * n
        count += n
    model.train()
    return total / max(count, 1)


def _lr_factor(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def save_pair_dir(
    model: Qwen2ForCausalLM, tok: PreTrainedTokenizerFast, state: dict[str, torch.Tensor], directory: Path
) -> str:
    """Write one HF directory (safetensors, config, generation config, tokenizer, manifest); returns its sha256."""
    model.load_state_dict(state)
    eos, pad = tok.convert_tokens_to_ids(IM_END), tok.convert_tokens_to_ids(PAD)
    # Qwen chat models stop on either token; sampling settings stay out (the engines set their own).
    model.generation_config = GenerationConfig(eos_token_id=[eos, pad], pad_token_id=pad)
    directory.mkdir(parents=True, exist_ok=True)
    for old in directory.iterdir():
        if old.is_file():
            old.unlink()
    model.save_pretrained(str(directory))
    tok.save_pretrained(str(directory))
    cfg_file = directory / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["tokenizer_class"] = (
        "Qwen2Tokenizer"  # what AutoTokenizer picks for model_type qwen2; say so explicitly
    )
    cfg_file.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return str(write_manifest(directory)["sha256"])


def build_pair(prompts_file: str | Path, out: str | Path, spec: PairSpec = PairSpec()) -> dict:
    """Build the pair into ``out/{teacher,student}`` and write ``out/pair.json``; returns its content.

    Raises:
        ValueError: ``student_step`` outside ``[1, steps)``, or too few rows fit ``seq_len``.
    """
    if not 1 <= spec.student_step < spec.steps:
        raise ValueError(
            f"student_step must be in [1, steps), got {spec.student_step} with steps={spec.steps}"
        )
    t0 = time.perf_counter()
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(spec.num_threads)
    try:
        prompts_file, out = Path(prompts_file), Path(out)
        prompts = load_prompts(prompts_file)
        answers = _answers(prompts_file) if prompts_file.suffix == ".parquet" else [""] * len(prompts)
        tok = build_tokenizer([_user_text(p) for p in prompts[: spec.tokenizer_rows]], spec.vocab_size)
        rows: list[list[int]] = []
        for prompt, answer in zip(prompts[: spec.train_rows + spec.val_rows], answers, strict=False):
            if not answer:
                continue
            chat = [*_messages(prompt), {"role": "assistant", "content": f"Answer: \\boxed{{{answer}}}"}]
            ids = tok(tok.apply_chat_template(chat, tokenize=False), add_special_tokens=False)["input_ids"]
            if len(ids) <= spec.seq_len:
                rows.append(ids)
        if len(rows) < spec.val_rows + spec.batch_size:
            raise ValueError(f"only {len(rows)} rows fit seq_len={spec.seq_len}; raise it or train_rows")
        train, val = rows[: -spec.val_rows], rows[-spec.val_rows :]
        pad_id = tok.convert_tokens_to_ids(PAD)

        torch.manual_seed(spec.seed)
        model = Qwen2ForCausalLM(_config(spec, tok))
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, betas=(0.9, 0.98), weight_decay=0.01)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, spec.warmup_steps, spec.steps))
        gen = torch.Generator().manual_seed(spec.seed + 1)
        initial_nll = _mean_nll(model, val, pad_id)
        student_state: dict[str, torch.Tensor] = {}
        losses = []
        for step in range(1, spec.steps + 1):
            pick = torch.randint(len(train), (spec.batch_size,), generator=gen).tolist()
            loss = model(**_batch([train[i] for i in pick], pad_id)).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            losses.append(round(loss.item(), 4))
            if step == spec.student_step:
                student_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                student_nll = _mean_nll(model, val, pad_id)
        teacher_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        teacher_nll = _mean_nll(model, val, pad_id)
        shas = {
            "teacher": save_pair_dir(model, tok, teacher_state, out / "teacher"),
            "student": save_pair_dir(model, tok, student_state, out / "student"),
        }
        info = {
            "spec": asdict(spec),
            "prompts_file": prompts_file.as_posix(),
            "rows": {"train": len(train), "val": len(val)},
            "parameters": sum(p.numel() for p in model.parameters()),
            "val_nll": {"init": initial_nll, "student": student_nll, "teacher": teacher_nll},
            "train_loss": losses,
            "manifest_sha256": shas,
            "wall_seconds": round(time.perf_counter() - t0, 2),
        }
        (out / "pair.json").write_text(json.dumps(info, indent=2) + "\n")
        return info
    finally:
        torch.set_num_threads(prev_threads)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipelines.make_pair", description=__doc__.splitlines()[0])
    ap.add_argument(
        "--prompts", default="data/dapo-math-17k.parquet", help="verl-layout parquet (or json/jsonl)"
    )
    ap.add_argument(
        "--out", default="models/dapo-pair", help="output directory (teacher/, student/, pair.json)"
    )
    for name, default in asdict(PairSpec()).items():
        ap.add_argument(f"--{name.replace('_', '-')}", type=type(default), default=default)
    args = vars(ap.parse_args(argv))
    prompts, out = args.pop("prompts"), args.pop("out")
    try:
        info = build_pair(prompts, out, PairSpec(**args))
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    nll = info["val_nll"]
    print(
        f"{out}: {info['parameters'] / 1e6:.2f}M parameters, held-out NLL init {nll['init']:.3f} -> student "
        f"{nll['student']:.3f} (step {info['spec']['student_step']}) -> teacher {nll['teacher']:.3f} "
        f"(step {info['spec']['steps']}), {info['wall_seconds']:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
