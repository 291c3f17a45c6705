"""A tiny teacher/student pair on disk (real HF directories) for trainer and pipeline tests.

Loaded as a pytest plugin (``-p tiny_pair`` in pyproject), so the ``tiny_pair`` fixture is available everywhere.

The student is the teacher plus noise: a shared lineage, so OPRD has aligned hidden states to pull together.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from trainer.config import Params, load_params

SYMBOLS = ["<pad>", "<s>", "</s>", *list("0123456789+-= ")]


def build_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {s: i for i, s in enumerate(SYMBOLS)}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tk.decoder = decoders.Fuse()
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    # Stock AutoTokenizer rebuilds a qwen2 directory's vocabulary with Qwen's byte-level pipeline, which drops a
    # plain " " token; as an added token it is matched first (see pipelines.task.build_tokenizer).
    tk.add_tokens([AddedToken(" ", normalized=False, special=False)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<pad>"
    )


def save_model(model: Qwen2ForCausalLM, tok, path: Path) -> Path:
    model.generation_config = GenerationConfig(eos_token_id=2, pad_token_id=0, bos_token_id=1)
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path


def tiny_config(hidden=32, layers=2) -> Qwen2Config:
    return Qwen2Config(
        vocab_size=len(SYMBOLS), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True,
        eos_token_id=2, pad_token_id=0, bos_token_id=1,
    )  # fmt: skip


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory) -> dict[str, Path]:
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("pair")
    tok = build_tokenizer()
    torch.manual_seed(0)
    teacher = Qwen2ForCausalLM(tiny_config())
    student = Qwen2ForCausalLM(tiny_config())
    student.load_state_dict(teacher.state_dict())
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.01 * torch.randn_like(p))  # HF init std is 0.02: same lineage, not a copy
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(f'{{"prompt": "{a}+{b}="}}\n' for a in range(10, 30) for b in range(3, 5)))
    return {
        "teacher": save_model(teacher, tok, root / "teacher"),
        "student": save_model(student, tok, root / "student"),
        "prompts": prompts,
    }


def tiny_params(pair: dict[str, Path], tmp: Path, **overrides) -> Params:
    base = {
        "models.teacher.path": str(pair["teacher"]),
        "models.student.path": str(pair["student"]),
        "models.embedded": False,
        "task.prompts_file": str(pair["prompts"]),
        "rollout.max_new_tokens": 8,
        "distill.steps": 6,
        "distill.prompts_per_step": 4,
        "distill.n_responses": 2,
        "distill.eval_every": 0,
        "distill.memory_every": 0,
        "optim.lr": 3e-3,
        "optim.num_threads": 1,
        "checkpoint.dir": str(tmp / "ckpt"),
        "checkpoint.every": 2,
    }
    base.update(overrides)
    return load_params(None, base)


def assert_resumed(rows: list[dict], resumed_at: int, total: int) -> None:
    """What only a real resume leaves in the per-step rows (``Trainer.fit`` history / ``metrics.jsonl``).

    Steps ``1..total`` each appear once; steps up to ``resumed_at`` were computed by the interrupted process
    (a fresh start), and every later step by the resumed process, which started at ``resumed_at`` and counted
    ``step - resumed_at`` train steps of its own. A restart from step 0 reproduces the same losses and weights
    (the runs are deterministic) but not this.
    """
    assert resumed_at > 0, "no checkpoint to resume from: the test did not interrupt the run"
    assert [r["step"] for r in rows] == list(range(1, total + 1)), "each step logged exactly once"
    for r in rows:
        if r["step"] <= resumed_at:
            assert r["run/resumed_from"] == 0, f"step {r['step']} was not restored from the checkpoint: {r}"
        else:
            assert (r["run/resumed_from"], r["run/steps_this_process"]) == (
                resumed_at,
                r["step"] - resumed_at,
            ), f"step {r['step']} was not computed by a process that resumed at step {resumed_at}: {r}"


@pytest.fixture(scope="session")
def wide_teacher(tiny_pair) -> Path:
    """A teacher of the same tokenizer, wider (hidden 48 vs 32) and deeper (3 vs 2 blocks) than ``tiny_pair``'s
    student, independently initialized: the OPRD-Bridge setting (vanilla OPRD refuses it)."""
    torch.set_num_threads(1)
    torch.manual_seed(7)
    teacher = Qwen2ForCausalLM(tiny_config(hidden=48, layers=3))
    return save_model(teacher, build_tokenizer(), tiny_pair["teacher"].parent / "teacher-wide")


def train_argv(tmp: Path, sets: dict) -> list[str]:
    """``python -m trainer.train`` arguments for a run under ``tmp``: an empty ``params.yaml``, ``--out tmp/out``
    and one ``--set key=value`` per item of ``sets`` (the tests' subprocess runs)."""
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "params.yaml").write_text("{}\n")
    out = ["--params", str(tmp / "params.yaml"), "--out", str(tmp / "out")]
    return out + [x for k, v in sets.items() for x in ("--set", f"{k}={v}")]
