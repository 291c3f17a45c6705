"""Every model directory the project writes loads with stock Hugging Face classes and round-trips text exactly.

The directories: the committed bootstrap outputs (teacher, student base), and what the trainer writes from them
(the best-on-validation export under the checkpoint directory, the final student, a direct export). For each:
``AutoTokenizer`` gives the task tokenizer's ids and decodes them back to the same text, special tokens are the
task's, there is no chat template to disagree about, ``AutoModelForCausalLM`` loads the weights, and
``transformers.pipeline("text-generation")`` produces the same greedy text as the project's own loader and engine.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

from pipelines.evaluation import encode_prompt
from pipelines.task import build_tokenizer
from trainer.config import load_params
from trainer.models import CompatibilityError, load_tokenizer
from trainer.rollout import HFGenerateEngine
from trainer.train import Trainer

REPO = Path(__file__).resolve().parents[2]
MODELS = REPO / "artifacts" / "models"
TASK = REPO / "artifacts" / "task"


def _task_texts(n: int = 40) -> list[str]:
    rows = [json.loads(r) for r in (TASK / "val.jsonl").read_text().splitlines()[:n]]
    # prompts, a gold-like worked chain with the answer box, negative numbers and doubled spaces
    return [r["prompt"] for r in rows] + [
        "12+3=15 \\boxed{15}",
        "55+84=139 139-37=102 102+74=176 \\boxed{176}",
        "9-12=-3  \\boxed{-3}}",
    ]


@pytest.fixture(scope="module")
def trained_dirs(tmp_path_factory) -> dict[str, Path]:
    """Two steps of OPRD from the committed pair; step 1 is best on 'validation', so the final student is the
    best export copied out of the checkpoint directory."""
    tmp = tmp_path_factory.mktemp("hfexport")
    params = load_params(None, {
        "models.teacher.path": str(MODELS / "teacher"), "models.student.path": str(MODELS / "student-base"),
        "models.embedded": False, "task.prompts_file": str(TASK / "train.jsonl"), "rollout.max_new_tokens": 8,
        "distill.steps": 2, "distill.prompts_per_step": 2, "distill.n_responses": 1, "distill.eval_every": 1,
        "distill.memory_every": 0, "optim.num_threads": 1, "checkpoint.dir": str(tmp / "ckpt"),
        "checkpoint.every": 0,
    })  # fmt: skip
    trainer = Trainer(params, tmp / "out", validator=lambda _m, step: {"val/accuracy": 1.0 / step})
    try:
        result = trainer.fit()
        direct = trainer.export(tmp / "direct", extra={"step": result.steps})
        best = tmp / "best-copy"
        shutil.copytree(trainer.best_dir, best)  # the best export as it sits with the checkpoints
    finally:
        trainer.close()
    assert result.best_step == 1 and result.export_dir is not None
    return {"best": best, "final": result.export_dir, "direct": direct}


def _dirs(trained: dict[str, Path]) -> dict[str, Path]:
    return {"teacher": MODELS / "teacher", "student-base": MODELS / "student-base", **trained}


def test_stock_tokenizer_round_trips_every_written_directory(trained_dirs):
    ref = build_tokenizer()
    for name, d in _dirs(trained_dirs).items():
        tok = AutoTokenizer.from_pretrained(d)
        for text in _task_texts():
            ids = tok(text)["input_ids"]
            assert ids == ref(text)["input_ids"], (name, text)
            assert tok.decode(ids, skip_special_tokens=True) == text, (name, text)
            assert tok.decode(ids) == "<s>" + text, (name, text)
        assert tok.get_vocab() == ref.get_vocab(), name
        specials = (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id)
        assert (
            specials
            == (ref.bos_token_id, ref.eos_token_id, ref.pad_token_id, ref.unk_token_id)
            == (1, 2, 0, 3)
        )
        assert tok.padding_side == "left" and tok.chat_template is None, name
        model = AutoModelForCausalLM.from_pretrained(d)
        assert model.config.vocab_size == len(tok) == 20, name


def test_pipeline_greedy_text_equals_the_projects_loader(trained_dirs):
    prompts = _task_texts(6)[:6]
    torch.manual_seed(0)
    for name, d in _dirs(trained_dirs).items():
        pipe = pipeline("text-generation", model=str(d), device="cpu")
        theirs = [
            out[0]["generated_text"]
            for out in pipe(prompts, do_sample=False, max_new_tokens=42, return_full_text=False)
        ]
        tok = load_tokenizer(d)
        model = AutoModelForCausalLM.from_pretrained(d, use_safetensors=True, dtype=torch.float32).eval()
        engine = HFGenerateEngine(pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        batch = engine.generate(
            model, [encode_prompt(tok, p, chat=False) for p in prompts],
            n=1, temperature=0.0, top_p=1.0, max_new_tokens=42,
        )  # fmt: skip
        ours = tok.batch_decode(batch.response_ids, skip_special_tokens=True)
        assert theirs == ours, name
        assert any("\\boxed{" in t for t in ours), (name, ours)  # real answers, not empty strings


def test_export_carries_the_base_tokenizer_files_byte_for_byte(trained_dirs):
    for name in ("best", "final", "direct"):
        for f in ("tokenizer.json", "tokenizer_config.json"):
            assert (trained_dirs[name] / f).read_bytes() == (MODELS / "student-base" / f).read_bytes(), (
                name,
                f,
            )


def test_a_directory_stock_loading_would_mangle_is_refused(tmp_path):
    """The old export (no added tokens): AutoTokenizer rebuilds it as Qwen2Tokenizer, which drops the space and
    ``\\boxed{``; the project's loader refuses it instead of training on different ids."""
    d = tmp_path / "old"
    shutil.copytree(MODELS / "student-base", d)
    tj = json.loads((d / "tokenizer.json").read_text())
    tj["added_tokens"] = [t for t in tj["added_tokens"] if t["special"]]
    (d / "tokenizer.json").write_text(json.dumps(tj))
    text = "12+3=15 \\boxed{15}"
    stock = AutoTokenizer.from_pretrained(d)
    assert stock.decode(stock(text)["input_ids"], skip_special_tokens=True) != text  # the mangling is real
    with pytest.raises(CompatibilityError, match=r"tokenizes differently from its tokenizer\.json"):
        load_tokenizer(d)
