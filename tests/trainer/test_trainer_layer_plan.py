"""``distill.rep.layers`` reaches the loss: a Trainer built from config plans exactly the configured HF layers and
logs a cosine for exactly those (vanilla OPRD on a 4-block pair, where ``last``, ``odd`` and ``[1]`` all differ)."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_pair import build_tokenizer, save_model, tiny_config, tiny_params
from transformers import Qwen2ForCausalLM

from trainer.metrics import JsonlLogger
from trainer.train import Trainer


@pytest.fixture(scope="module")
def deep_pair(tiny_pair, tmp_path_factory):
    """Four decoder blocks (HF indices 1..4), student = teacher + noise, the tiny pair's tokenizer and prompts."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("deep")
    torch.manual_seed(3)
    teacher = Qwen2ForCausalLM(tiny_config(layers=4))
    student = Qwen2ForCausalLM(tiny_config(layers=4))
    student.load_state_dict(teacher.state_dict())
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.01 * torch.randn_like(p))
    tok = build_tokenizer()
    return {
        "teacher": save_model(teacher, tok, root / "teacher"),
        "student": save_model(student, tok, root / "student"),
        "prompts": tiny_pair["prompts"],
    }


@pytest.mark.parametrize(
    ("layers", "expected"),
    [("last", [4]), ("odd", [2, 4]), ("even", [1, 3]), ([1], [1]), ("all", [1, 2, 3, 4])],
)
def test_rep_layers_are_planned_and_logged_exactly(deep_pair, tmp_path, layers, expected):
    params = tiny_params(
        deep_pair, tmp_path, **{"distill.method": "oprd", "distill.rep.layers": layers, "distill.steps": 1,
                                "checkpoint.every": 0, "distill.prompts_per_step": 2},
    )  # fmt: skip
    assert params.distill.rep.layers == layers
    log = tmp_path / "metrics.jsonl"
    trainer = Trainer(params, tmp_path / "out", logger=JsonlLogger(log))
    try:
        assert (trainer.plan.student, trainer.plan.teacher) == (
            expected,
            expected,
        )  # same depth: identity map
        result = trainer.fit()
    finally:
        trainer.close()
    (row,) = [json.loads(line) for line in log.read_text().splitlines()]
    logged = sorted(int(k.rsplit("_", 1)[1]) for k in row if k.startswith("rep/cosine/layer_"))
    assert logged == expected, row
    assert result.history[0]["loss/rep"] > 0
