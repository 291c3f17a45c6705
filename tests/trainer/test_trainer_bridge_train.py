"""``distill.method: oprd_bridge`` in the trainer: a wider, deeper teacher through a fitted bank."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from tiny_pair import tiny_params, train_argv

from pipelines.stage_bridge import build_bank
from trainer.bridge import check_bank, load_bank, save_bank
from trainer.config import ConfigError
from trainer.models import CompatibilityError
from trainer.train import Trainer


def bridge_params(tiny_pair, wide_teacher, tmp, **overrides):
    base = {
        "models.teacher.path": str(wide_teacher),
        "distill.method": "oprd_bridge",
        "distill.bridge.bank": str(tmp / "bank"),
        "distill.bridge.num_prompts": 40,
        "distill.bridge.rank": 4,
        "distill.bridge.epochs": 30,
        "distill.bridge.lr": 1e-2,
        "distill.bridge.batch_rows": 64,
        "distill.bridge.min_val_cosine": 0.3,
        "distill.rep.coef": 10.0,
        **overrides,
    }
    return tiny_params(tiny_pair, tmp, **base)


@pytest.fixture(scope="module")
def fitted(tiny_pair, wide_teacher, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bridge")
    params = bridge_params(tiny_pair, wide_teacher, tmp)
    built = build_bank(params)
    save_bank(built.fit.bank, tmp / "bank")
    return tmp, built


def _fit(params, out):
    trainer = Trainer(params, out)
    try:
        return trainer, trainer.fit()
    finally:
        trainer.close()


def test_bank_fit_beats_its_initialization(fitted):
    _, built = fitted
    meta = built.fit.bank.meta
    assert meta.student_layers == [1, 2] and meta.teacher_layers == [1, 3]  # proportional map 2 -> 3 blocks
    assert (meta.d_student, meta.d_teacher, meta.rank) == (32, 48, 4)
    assert meta.val_cosine_mean > 0.5 and meta.val_cosine_mean > sum(meta.val_cosine_init) / 2 + 0.3
    assert built.rows_val > 0 and built.rows_train > built.rows_val


def test_vanilla_oprd_refuses_the_wide_teacher_and_names_the_bridge(tiny_pair, wide_teacher, tmp_path):
    with pytest.raises(CompatibilityError, match="oprd_bridge"):
        Trainer(
            tiny_params(tiny_pair, tmp_path, **{"models.teacher.path": str(wide_teacher)}), tmp_path / "o"
        )


def test_oprd_bridge_trains_with_a_frozen_projector(tiny_pair, wide_teacher, fitted, tmp_path):
    tmp, _ = fitted
    params = bridge_params(tiny_pair, wide_teacher, tmp_path, **{
        "distill.bridge.bank": str(tmp / "bank"), "distill.steps": 20, "checkpoint.every": 0,
    })  # fmt: skip
    trainer, result = _fit(params, tmp_path / "out")
    losses = [h["loss/total"] for h in result.history]
    cos = [h["rep/cosine/mean"] for h in result.history]
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5
    assert sum(cos[-5:]) / 5 > sum(cos[:5]) / 5
    assert {"rep/cosine/layer_1", "rep/cosine/layer_2"} <= set(result.history[-1])
    saved = load_bank(tmp / "bank")
    for k, v in saved.state_dict().items():  # P_S frozen (the default): the bank is unchanged
        assert torch.equal(v, trainer.bank.state_dict()[k])
    assert (result.export_dir / "model.safetensors").is_file()


def test_train_projector_updates_it_jointly(tiny_pair, wide_teacher, fitted, tmp_path):
    tmp, _ = fitted
    params = bridge_params(tiny_pair, wide_teacher, tmp_path, **{
        "distill.bridge.bank": str(tmp / "bank"), "distill.steps": 2, "distill.bridge.train_projector": True,
    })  # fmt: skip
    trainer, _ = _fit(params, tmp_path / "out")
    saved = load_bank(tmp / "bank")
    changed = [
        not torch.equal(v, trainer.bank.projectors.state_dict()[k])
        for k, v in saved.projectors.state_dict().items()
    ]
    assert all(changed)
    assert torch.equal(saved.teacher_bases, trainer.bank.teacher_bases)  # P_T stays fixed


def test_a_poor_bank_is_refused(tiny_pair, wide_teacher, fitted, tmp_path):
    tmp, built = fitted
    need = built.fit.bank.meta.val_cosine_mean + 0.01
    params = bridge_params(tiny_pair, wide_teacher, tmp_path, **{
        "distill.bridge.bank": str(tmp / "bank"), "distill.bridge.min_val_cosine": min(need, 1.0),
    })  # fmt: skip
    with pytest.raises(CompatibilityError, match="min_val_cosine"):
        Trainer(params, tmp_path / "out")


def test_a_bank_of_another_pair_or_plan_is_refused(tiny_pair, wide_teacher, fitted, tmp_path):
    tmp, _ = fitted
    other = bridge_params(tiny_pair, wide_teacher, tmp_path, **{
        "distill.bridge.bank": str(tmp / "bank"), "models.teacher.path": str(tiny_pair["teacher"]),
    })  # fmt: skip
    with pytest.raises(CompatibilityError, match="fitted for layer pairs"):  # 2-block teacher: other pairs
        Trainer(other, tmp_path / "a")
    bank = load_bank(tmp / "bank")
    with pytest.raises(CompatibilityError, match="hidden sizes 32 -> 48"):
        check_bank(bank, [1, 2], [1, 3], 32, 64, min_val_cosine=0.0)
    bank.meta.sources = {"teacher": "cd" * 32}  # fitted on a teacher with this manifest digest
    with pytest.raises(CompatibilityError, match="another teacher"):
        check_bank(bank, [1, 2], [1, 3], 32, 48, min_val_cosine=0.0, sources={"teacher": "ab" * 32})
    bank.meta.sources = {"teacher": "ab" * 32}
    check_bank(bank, [1, 2], [1, 3], 32, 48, min_val_cosine=0.0, sources={"teacher": "ab" * 32})
    last = bridge_params(tiny_pair, wide_teacher, tmp_path, **{
        "distill.bridge.bank": str(tmp / "bank"), "distill.rep.layers": "last",
    })  # fmt: skip
    with pytest.raises(CompatibilityError, match="fitted for layer pairs"):
        Trainer(last, tmp_path / "b")
    with pytest.raises(FileNotFoundError, match="bridge stage"):
        Trainer(bridge_params(tiny_pair, wide_teacher, tmp_path), tmp_path / "c")


def test_different_tokenizers_stay_refused_for_the_bridge(tiny_pair, wide_teacher, tmp_path):
    other = tmp_path / "other-tok"
    shutil.copytree(wide_teacher, other)
    tj = json.loads((other / "tokenizer.json").read_text())
    tj["model"]["vocab"]["x"] = tj["model"]["vocab"].pop("9")
    (other / "tokenizer.json").write_text(json.dumps(tj))
    params = bridge_params(tiny_pair, wide_teacher, tmp_path, **{"models.teacher.path": str(other)})
    with pytest.raises(CompatibilityError, match="tokenizers differ"):
        build_bank(params)


def test_trained_projector_under_torchrun_is_refused_clearly(
    tiny_pair, wide_teacher, fitted, tmp_path, monkeypatch
):
    from trainer.distributed import DistEnv
    from trainer.train import load_checked_bank

    tmp, _ = fitted
    params = bridge_params(tiny_pair, wide_teacher, tmp_path, **{
        "distill.bridge.bank": str(tmp / "bank"), "distill.bridge.train_projector": True,
    })  # fmt: skip
    env = DistEnv(rank=0, world_size=2, local_rank=0, device=torch.device("cpu"))
    with pytest.raises(ConfigError, match="single-process only"):
        load_checked_bank(params, None, None, None, env)


@pytest.mark.slow
def test_two_process_fsdp2_bridge_matches_single_process(tiny_pair, wide_teacher, fitted, tmp_path):
    """One bank for all ranks: 2 FSDP2 processes reproduce the 1-process losses on the same global batch."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    bank, _ = fitted

    def args(tmp: Path) -> list[str]:
        sets = {
            "models.teacher.path": wide_teacher, "models.student.path": tiny_pair["student"],
            "models.embedded": False, "task.prompts_file": tiny_pair["prompts"], "rollout.max_new_tokens": 8,
            "rollout.temperature": 0, "distill.method": "oprd_bridge", "distill.bridge.bank": bank / "bank",
            "distill.bridge.min_val_cosine": 0.3, "distill.rep.coef": 10.0, "distill.steps": 4,
            "distill.prompts_per_step": 4, "distill.n_responses": 1, "distill.eval_every": 0,
            "distill.memory_every": 0, "optim.lr": 3e-3, "optim.num_threads": 1, "checkpoint.dir": tmp / "ckpt",
            "checkpoint.every": 2,
        }  # fmt: skip
        return train_argv(tmp, sets)

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    run = dict(env=env, capture_output=True, text=True, timeout=300)
    one = subprocess.run([sys.executable, "-m", "trainer.train", *args(tmp_path / "one")], **run)
    assert one.returncode == 0, one.stderr[-3000:]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    two = subprocess.run([*torchrun, "-m", "trainer.train", *args(tmp_path / "two")], **run)
    assert two.returncode == 0, two.stderr[-3000:]

    def column(tmp: Path, key: str) -> list[float]:
        rows = [json.loads(r) for r in (tmp / "out" / "metrics.jsonl").read_text().splitlines()]
        return [r[key] for r in rows]

    l1, l2 = column(tmp_path / "one", "loss/total"), column(tmp_path / "two", "loss/total")
    assert len(l1) == len(l2) == 4
    assert l2 == pytest.approx(l1, rel=2e-4, abs=1e-6)
    c2 = column(tmp_path / "two", "rep/cosine/mean")
    assert l2[-1] < l2[0] and c2[-1] > c2[0]
    assert (tmp_path / "two" / "out" / "student" / "model.safetensors").is_file()


def test_objective_loss_is_the_normalized_code_mse_by_hand(tiny_pair, wide_teacher, fitted, tmp_path):
    """coef * mean over layers of token-mean (2 - 2 cos(P_S h_S, (h_T - mu) P_T^T)) / r, from the trainer's pieces."""
    from trainer.hidden import capture_hidden_states
    from trainer.objectives import Denominators

    tmp, _ = fitted
    params = bridge_params(tiny_pair, wide_teacher, tmp_path, **{"distill.bridge.bank": str(tmp / "bank")})
    trainer = Trainer(params, tmp_path / "out")
    try:
        prompts = [trainer.prompt_ids[i] for i in range(4)]
        batch = trainer.engine.generate(
            trainer.student, prompts, n=1, temperature=1.0, top_p=1.0, max_new_tokens=8
        )
        targets = trainer.objective.prepare(trainer.student, trainer.teacher, batch)
        den = trainer.objective.denominators(batch, targets)
        loss, metrics = trainer.objective.loss(
            trainer.student, batch, targets, Denominators(den.selected, den.response)
        )
        args = (batch.input_ids, batch.attention_mask, batch.position_ids, batch.response_mask)
        with torch.no_grad():
            hs = capture_hidden_states(trainer.student, *args, [1, 2], "all")
            ht = capture_hidden_states(trainer.teacher, *args, [1, 3], "all")
            bank = load_bank(tmp / "bank")
            m = hs.mask.float()
            per_layer = []
            for i, key in enumerate(bank.keys):
                zs = bank.projectors[key](hs.states[:, i])
                zt = (ht.states[:, i] - bank.teacher_means[i]) @ bank.teacher_bases[i].T
                err = (2 - 2 * torch.nn.functional.cosine_similarity(zs, zt, dim=-1)) / bank.meta.rank
                per_layer.append((err * m).sum() / m.sum())
            expected = 10.0 * torch.stack(per_layer).mean()
        assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
        assert metrics["loss/total"] == pytest.approx(expected.item(), rel=1e-5)
    finally:
        trainer.close()


def test_step_one_code_cosine_is_the_banks_validation_cosine(tiny_pair, wide_teacher, fitted, tmp_path):
    """The trainer uses the fitted bank: before any update the student is the base the bank was fitted on, so
    the step-1 code-space cosine on its own rollouts is close to the cosine the bridge stage recorded on held-out
    responses (an unfitted or wrongly loaded projector gives ~0.2 or less, see the bank's ``val_cosine_init``)."""
    tmp, built = fitted
    meta = built.fit.bank.meta
    params = bridge_params(tiny_pair, wide_teacher, tmp_path, **{
        "distill.bridge.bank": str(tmp / "bank"), "distill.steps": 1, "checkpoint.every": 0,
        "distill.prompts_per_step": 8, "distill.n_responses": 2,
    })  # fmt: skip
    _, result = _fit(params, tmp_path / "out")
    step1 = result.history[0]  # measured: 0.95 / 0.88 per layer against the bank's 0.97 / 0.92
    for idx, val, init in zip(meta.student_layers, meta.val_cosine, meta.val_cosine_init, strict=True):
        assert step1[f"rep/cosine/layer_{idx}"] == pytest.approx(val, abs=0.1), (idx, step1, meta.val_cosine)
        assert step1[f"rep/cosine/layer_{idx}"] > init + 0.5
