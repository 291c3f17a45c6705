"""Each method's no-grad passes and student loss on a tiny pair with a real rollout."""

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from trainer.config import DistillConfig, OPDConfig, RepConfig
from trainer.hidden import layer_indices
from trainer.models import LayerPlan
from trainer.objectives import Objective
from trainer.rollout import HFGenerateEngine


def _model(seed):
    torch.manual_seed(seed)
    cfg = Qwen2Config(
        vocab_size=23, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, tie_word_embeddings=True, eos_token_id=2, pad_token_id=0, bos_token_id=1,
    )  # fmt: skip
    return Qwen2ForCausalLM(cfg)


@pytest.fixture(scope="module")
def setup():
    torch.set_num_threads(1)
    student, teacher = _model(0), _model(1).eval().requires_grad_(False)
    torch.manual_seed(3)
    batch = HFGenerateEngine(pad_token_id=0, eos_token_id=2).generate(
        student, [[1, 5, 6], [1, 7]], n=2, temperature=1.0, top_p=1.0, max_new_tokens=6
    )
    plan = LayerPlan(student=layer_indices(2, "all"), teacher=layer_indices(2, "all"))
    return student, teacher, batch, plan


def _run(setup, method, coef=1.0, **kw):
    student, teacher, batch, plan = setup
    cfg = DistillConfig(
        method=method, rep=RepConfig(positions="all", coef=coef), opd=OPDConfig(top_k=4, kl_chunk_size=3)
    )
    obj = Objective(cfg, plan, **kw)
    targets = obj.prepare(student, teacher, batch)
    student.zero_grad(set_to_none=True)
    loss, metrics = obj.loss(student, batch, targets, obj.denominators(batch, targets))
    loss.backward()
    grad = torch.cat([p.grad.flatten() for p in student.parameters() if p.grad is not None])
    return loss, metrics, grad


@pytest.mark.parametrize("method", ["oprd", "opd_sampled", "opd_topk", "full_kl", "combined"])
def test_every_method_gives_finite_loss_and_gradient(setup, method):
    loss, metrics, grad = _run(setup, method)
    assert torch.isfinite(loss) and torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert metrics["loss/total"] == pytest.approx(loss.item())


def test_oprd_reports_per_layer_cosine(setup):
    _, metrics, _ = _run(setup, "oprd")
    assert {"rep/cosine/layer_1", "rep/cosine/layer_2"} <= metrics.keys()
    assert all(-1.0 <= metrics[f"rep/cosine/layer_{i}"] <= 1.0 for i in (1, 2))


def test_cosine_monitoring_is_opt_in_for_output_space_methods(setup):
    _, plain, _ = _run(setup, "opd_sampled")
    _, monitored, _ = _run(setup, "opd_sampled", monitor_cosine=True)
    assert not any(k.startswith("rep/") for k in plain)  # no hidden states captured by default
    assert {"rep/cosine/layer_1", "rep/cosine/layer_2"} <= monitored.keys()
    assert plain["loss/total"] == pytest.approx(
        monitored["loss/total"], rel=1e-6
    )  # monitoring changes nothing


@pytest.mark.parametrize("mu", [0.0, 2.5])
def test_combined_is_opd_plus_mu_times_rep_from_independent_objectives(setup, mu):
    """Eq. 7 with μ = distill.rep.coef, against the two terms computed by the plain ``opd_sampled`` and ``oprd``
    objectives on the same batch (loss and gradient: both are linear in the terms)."""
    l_opd, _, g_opd = _run(setup, "opd_sampled")
    l_rep, _, g_rep = _run(setup, "oprd", coef=1.0)
    l_comb, m_comb, g_comb = _run(setup, "combined", coef=mu)
    assert l_comb.item() == pytest.approx(l_opd.item() + mu * l_rep.item(), rel=1e-5)
    torch.testing.assert_close(g_comb, g_opd + mu * g_rep, rtol=1e-4, atol=1e-7)
    assert m_comb["loss/rep"] == pytest.approx(l_rep.item(), rel=1e-5)  # the unweighted term is reported


def test_rep_coef_scales_the_oprd_loss(setup):
    l1, _, g1 = _run(setup, "oprd", coef=1.0)
    l3, _, g3 = _run(setup, "oprd", coef=3.0)
    assert l3.item() == pytest.approx(3.0 * l1.item(), rel=1e-6)
    torch.testing.assert_close(g3, 3.0 * g1)


def test_chunked_and_plain_full_kl_agree(setup):
    l1, _, g1 = _run(setup, "full_kl", chunked_kl=True)
    l2, _, g2 = _run(setup, "full_kl", chunked_kl=False)
    assert l1.item() == pytest.approx(l2.item(), rel=1e-4)
    torch.testing.assert_close(g1, g2, rtol=1e-3, atol=1e-6)


def test_student_equal_to_teacher_gives_zero_rep_loss(setup):
    student, _, batch, plan = setup
    teacher = _model(0).eval().requires_grad_(False)
    obj = Objective(DistillConfig(method="oprd"), plan)
    targets = obj.prepare(student, teacher, batch)
    loss, metrics = obj.loss(student, batch, targets, obj.denominators(batch, targets))
    assert loss.item() == pytest.approx(0.0, abs=1e-10)
    assert metrics["rep/cosine/layer_2"] == pytest.approx(1.0, abs=1e-5)
