"""The on-policy loop end to end on a tiny pair: learning signal, resume, crash and NaN behaviour."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_pair import assert_resumed, tiny_params

from trainer.checkpoint import Checkpointer, complete_checkpoints
from trainer.export import verify_manifest
from trainer.train import NonFiniteLossError, Trainer


def _fit(params, out, **kw):
    trainer = Trainer(params, out)
    try:
        return trainer.fit(**kw)
    finally:
        trainer.close()


def _losses(result):
    return [h["loss/total"] for h in result.history]


def test_oprd_loss_falls_and_cosine_rises(tiny_pair, tmp_path):
    params = tiny_params(tiny_pair, tmp_path, **{"distill.steps": 20, "checkpoint.every": 0})
    result = _fit(params, tmp_path / "out")
    losses = _losses(result)
    cos = [h["rep/cosine/mean"] for h in result.history]
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5
    assert sum(cos[-5:]) / 5 > sum(cos[:5]) / 5
    export = result.export_dir
    assert export is not None and (export / "model.safetensors").is_file()
    verify_manifest(export)
    for key in ("response/length_mean", "perf/tokens_per_second", "optim/grad_norm", "rep/cosine/layer_2"):
        assert key in result.history[-1]


@pytest.mark.parametrize("method", ["opd_sampled", "opd_topk", "full_kl", "combined"])
def test_baselines_train(tiny_pair, tmp_path, method):
    params = tiny_params(
        tiny_pair, tmp_path, **{"distill.method": method, "distill.steps": 2, "distill.opd.top_k": 4}
    )
    result = _fit(params, tmp_path / "out")
    assert result.steps == 2 and all(torch.isfinite(torch.tensor(_losses(result))))
    # the configured method's terms, not another method's: each objective reports exactly its own
    terms = {k for k in result.history[-1] if k.startswith("loss/")}
    expected = {"opd_sampled": {"opd"}, "opd_topk": {"opd"}, "full_kl": {"kl"}, "combined": {"opd", "rep"}}[
        method
    ]
    assert terms == {"loss/total", *(f"loss/{t}" for t in expected)}
    # hidden states only where the loss uses them (cosine monitoring is opt-in for output-space methods)
    assert ("rep/cosine/mean" in result.history[-1]) == (method == "combined")


def _interrupt_and_resume(tiny_pair, tmp):
    params = tiny_params(tiny_pair, tmp)
    first = _fit(params, tmp / "out", stop_after=3)  # "crashes" after step 3; last checkpoint is 2
    assert first.steps == 3 and [s for s, _ in complete_checkpoints(tmp / "ckpt")] == [2]
    return _fit(params, tmp / "out")


def test_resume_reproduces_uninterrupted_run_bitwise(tiny_pair, tmp_path):
    full = _fit(tiny_params(tiny_pair, tmp_path / "a"), tmp_path / "a" / "out")
    # every=2, keep_last=2: steps 2, 4, 6 were saved and only the newest two are kept
    assert [s for s, _ in complete_checkpoints(tmp_path / "a" / "ckpt")] == [4, 6]
    resumed = _interrupt_and_resume(tiny_pair, tmp_path / "b")
    # the resumed process started at step 2 and computed only steps 3-6 (1-2 restored with the checkpoint)
    assert (resumed.resumed_from, resumed.steps_computed) == (2, 4)
    assert_resumed(resumed.history, 2, 6)
    assert _losses(resumed) == _losses(full)  # bitwise: the same floats
    a = load_file(tmp_path / "a" / "out" / "student" / "model.safetensors")
    b = load_file(tmp_path / "b" / "out" / "student" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_checks_fail_against_a_resume_that_ignores_the_checkpoint(tiny_pair, tmp_path, monkeypatch):
    """The test of the test: a broken resume (the checkpoint is never loaded, the run restarts at step 0) still
    reproduces every loss and the final weights of an uninterrupted run, and the checks above reject it."""
    full = _fit(tiny_params(tiny_pair, tmp_path / "a"), tmp_path / "a" / "out")
    monkeypatch.setattr(Checkpointer, "load_latest", lambda *a, **k: None)
    broken = _interrupt_and_resume(tiny_pair, tmp_path / "b")
    assert _losses(broken) == _losses(full)  # what the old test checked: it cannot tell the difference
    assert [h["step"] for h in broken.history] == [1, 2, 3, 4, 5, 6]
    assert (broken.resumed_from, broken.steps_computed) == (0, 6)
    with pytest.raises(AssertionError, match="not computed by a process that resumed at step"):
        assert_resumed(broken.history, 2, 6)


def test_partial_checkpoints_are_ignored_and_cleaned(tiny_pair, tmp_path):
    params = tiny_params(tiny_pair, tmp_path)
    _fit(params, tmp_path / "out", stop_after=2)
    ck = tmp_path / "ckpt"
    # what a kill -9 during a save leaves: a .tmp dir, and a dir whose COMPLETE marker was never written
    (ck / "step_000004.tmp").mkdir()
    (ck / "step_000004.tmp" / "__0_0.distcp").write_bytes(b"partial")
    (ck / "step_000003").mkdir()
    (ck / "step_000003" / ".metadata").write_bytes(b"garbage")
    trainer = Trainer(params, tmp_path / "out")
    try:
        state = trainer.ckpt.load_latest(trainer.student, trainer.optimizer, trainer.scheduler)
    finally:
        trainer.close()
    assert state is not None and state.step == 2
    assert not (ck / "step_000004.tmp").exists()


def test_non_finite_loss_stops_before_step_and_keeps_last_checkpoint(tiny_pair, tmp_path):
    params = tiny_params(tiny_pair, tmp_path)
    _fit(params, tmp_path / "out", stop_after=2)
    ck_dir = complete_checkpoints(tmp_path / "ckpt")[-1][1]
    # a teacher whose weights went NaN: its hidden states, and so the loss, are NaN
    bad_teacher = tmp_path / "bad_teacher"
    import shutil

    shutil.copytree(tiny_pair["teacher"], bad_teacher)
    sd = load_file(bad_teacher / "model.safetensors")
    sd = {k: torch.full_like(v, float("nan")) if "layers.1.mlp" in k else v for k, v in sd.items()}
    save_file(sd, bad_teacher / "model.safetensors", metadata={"format": "pt"})
    bad = tiny_params(tiny_pair, tmp_path, **{"models.teacher.path": str(bad_teacher)})
    trainer = Trainer(bad, tmp_path / "out")
    before = None
    try:
        with pytest.raises(NonFiniteLossError, match=r"before optimizer\.step"):
            state = trainer.ckpt.load_latest(trainer.student, trainer.optimizer, trainer.scheduler)
            before = {k: v.clone() for k, v in trainer.student.state_dict().items()}
            trainer.train_step(state)
        after = trainer.student.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)
    finally:
        trainer.close()
    assert [s for s, _ in complete_checkpoints(tmp_path / "ckpt")] == [2]
    assert json.loads((ck_dir / "COMPLETE").read_text())["step"] == 2


def test_incompatible_tokenizers_are_refused(tiny_pair, tmp_path):
    import shutil

    from trainer.models import CompatibilityError

    other = tmp_path / "other"
    shutil.copytree(tiny_pair["teacher"], other)
    tj = json.loads((other / "tokenizer.json").read_text())
    vocab = tj["model"]["vocab"]
    vocab["x"] = vocab.pop("9")
    (other / "tokenizer.json").write_text(json.dumps(tj))
    with pytest.raises(CompatibilityError, match="same tokenizer"):
        Trainer(tiny_params(tiny_pair, tmp_path, **{"models.teacher.path": str(other)}), tmp_path / "out")


def test_missing_model_dir_is_a_clear_error(tiny_pair, tmp_path):
    with pytest.raises(FileNotFoundError, match="teacher directory not found"):
        Trainer(
            tiny_params(tiny_pair, tmp_path, **{"models.teacher.path": str(tmp_path / "nope")}),
            tmp_path / "o",
        )


def test_tokenizer_is_loaded_as_saved_not_as_the_model_type_suggests(tiny_pair):
    from tiny_pair import build_tokenizer

    from trainer.models import load_tokenizer

    tok = load_tokenizer(tiny_pair["student"])
    ref = build_tokenizer()
    text = "12+3=15 15-4=11"
    assert tok(text)["input_ids"] == ref(text)["input_ids"]
    assert tok.get_vocab() == ref.get_vocab()


def test_fidelity_probe_longer_than_the_context_does_not_warn(tmp_path, caplog):
    """The probe spans the vocabulary, so with a short ``model_max_length`` (the tool-call task's 128) it is longer
    than the model's context; it never meets the model, so loading must not log transformers' length warning."""
    import logging

    from pipelines.task_toolcall import build_tokenizer
    from trainer.models import load_tokenizer

    tok = build_tokenizer()
    tok.save_pretrained(tmp_path)
    assert tok.model_max_length == 128
    with caplog.at_level(logging.WARNING):
        load_tokenizer(tmp_path)
    assert not [r for r in caplog.records if "longer than the specified maximum" in r.getMessage()]
