"""The distill stage's validator: its protocol (evaluate's sampling vs greedy) decides what selects the export."""

from __future__ import annotations

import json

import pytest
import torch
from prefix_grader import prefix_grader_fixture  # noqa: F401 (the prefix_grader fixture)
from tiny_pair import tiny_params

from pipelines.stage_distill import Validator
from trainer.rollout import HFGenerateEngine
from trainer.train import Trainer


class RecordingEngine(HFGenerateEngine):
    """The real engine; it also records how it was asked to sample."""

    def __init__(self, base: HFGenerateEngine):
        super().__init__(pad_token_id=base.pad_token_id, eos_token_id=base.eos_token_id)
        self.calls: list[dict] = []

    def generate(self, model, prompts, **kw):
        batch = super().generate(model, prompts, **kw)
        self.calls.append({"prompts": len(prompts), "rows": batch.input_ids.shape[0], **kw})
        return batch


def _validator(tiny_pair, tmp_path, rows=None, **overrides):
    val = tmp_path / "val.jsonl"
    rows = rows or [{"id": f"v{i}", "prompt": f"{10 + i}+3=", "answer": str(13 + i)} for i in range(10)]
    val.write_text("".join(json.dumps(r) + "\n" for r in rows))
    params = tiny_params(tiny_pair, tmp_path, **{"evaluate.k": 3, "evaluate.temperature": 0.7,
                                                 "evaluate.top_p": 0.95, "evaluate.batch_size": 4, **overrides})  # fmt: skip
    trainer = Trainer(params, tmp_path / "out")
    engine = RecordingEngine(trainer.engine)
    trainer.engine = engine
    return Validator(trainer, val, params), trainer, engine


def test_evaluate_protocol_samples_k_per_problem_like_the_evaluate_stage(tiny_pair, tmp_path):
    validate, trainer, engine = _validator(tiny_pair, tmp_path)
    before = torch.get_rng_state()
    first = validate(trainer.student, 5)["val/accuracy"]
    assert torch.equal(torch.get_rng_state(), before)  # training's sampling stream is untouched
    # evaluate's sampling settings, k rows per problem, in evaluate.batch_size chunks covering every problem once
    assert {(c["n"], c["temperature"], c["top_p"], c["max_new_tokens"]) for c in engine.calls} == {
        (3, 0.7, 0.95, 42)
    }
    assert sum(c["prompts"] for c in engine.calls) == 10 and max(c["prompts"] for c in engine.calls) <= 4
    assert sum(c["rows"] for c in engine.calls) == 30
    assert abs(first * 30 - round(first * 30)) < 1e-6  # a fraction of the 30 samples
    # a fixed sampling seed: the same weights get the same score at every validation point
    assert validate(trainer.student, 10)["val/accuracy"] == first


def test_greedy_protocol_and_limit(tiny_pair, tmp_path):
    validate, trainer, engine = _validator(
        tiny_pair, tmp_path, **{"distill.val.protocol": "greedy", "distill.val.limit": 6}
    )
    score = validate(trainer.student, 1)["val/accuracy"]
    # one greedy response per problem at the rollout's max_new_tokens, in evaluate.batch_size (4) chunks
    assert [(c["n"], c["temperature"], c["max_new_tokens"]) for c in engine.calls] == [(1, 0.0, 8)] * 2
    assert [c["prompts"] for c in engine.calls] == [3, 3]
    assert abs(score * 6 - round(score * 6)) < 1e-6


def test_each_val_row_is_graded_by_its_own_grader(tiny_pair, tmp_path, prefix_grader):
    # Rows of a non-math grader (always / never correct) next to math rows that a random student cannot box.
    rows = [{"id": f"a{i}", "prompt": f"{10 + i}+3=", "grader": prefix_grader, "reference": {"prefix": ""}}
            for i in range(3)]  # fmt: skip
    rows += [{"id": "n", "prompt": "20+3=", "grader": prefix_grader, "reference": '{"prefix": "x"}'}]
    rows += [{"id": f"m{i}", "prompt": f"{30 + i}+3=", "answer": str(33 + i)} for i in range(2)]
    validate, trainer, _ = _validator(tiny_pair, tmp_path, rows=rows)
    assert validate(trainer.student, 1)["val/accuracy"] == pytest.approx(3 / 6)
