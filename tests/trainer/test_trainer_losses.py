"""Loss numerics against oprd-method.md's test vectors, hand-computed cases and autograd."""

import math

import pytest
import torch

from trainer.hidden import select_positions
from trainer.losses import (
    combined_loss,
    full_vocab_reverse_kl,
    full_vocab_reverse_kl_chunked,
    opd_sampled_token_loss,
    opd_topk_loss,
    representation_cosine,
    representation_loss,
    token_logprobs,
)


def _tv3_inputs():
    student = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [9.0, 9.0]]])  # [B=1, R=4, D=2]
    teacher = torch.tensor([[[1.0, 0.0]] * 4])
    response_mask = torch.tensor([[1, 1, 1, 0]])  # v = 3
    s, m = select_positions(student, response_mask, "last_k", k=2)
    t, _ = select_positions(teacher, response_mask, "last_k", k=2)
    return s, t, m


def test_tv3_raw_mse_is_paper_setting():
    s, t, m = _tv3_inputs()
    assert s.tolist() == [[[0.0, 1.0], [1.0, 1.0]]]
    assert m.tolist() == [[True, True]]
    assert representation_loss(s, t, m).item() == pytest.approx(0.75)


def test_tv3_normalized_and_cosine():
    s, t, m = _tv3_inputs()
    assert representation_loss(s, t, m, normalize=True).item() == pytest.approx(0.6464466, abs=1e-6)
    assert representation_cosine(s, t, m).mean().item() == pytest.approx(0.3535534, abs=1e-6)


def test_tv3c_layer_mean():
    # two layers, one token, per-token errors 2 and 0 -> mean 1.0
    s = torch.tensor([[[[2.0, 2.0]], [[0.0, 0.0]]]])  # [B=1, Λ=2, W=1, D=2]
    t = torch.zeros_like(s)
    t[0, 0, 0] = torch.tensor([0.0, 0.0])
    s[0, 0, 0] = torch.tensor([math.sqrt(2.0), math.sqrt(2.0)])  # ||·||²/D = 2
    m = torch.ones(1, 1, dtype=torch.bool)
    assert representation_loss(s, t, m).item() == pytest.approx(1.0)


def test_tv3d_last_position():
    s = torch.tensor([[[1.0, 2.0]]])  # [B, W=1, D]
    t = torch.zeros_like(s)
    m = torch.ones(1, 1, dtype=torch.bool)
    assert representation_loss(s, t, m).item() == pytest.approx(2.5)
    assert representation_loss(s, t, m, normalize=True).item() == pytest.approx(0.5)


def test_aggregations_differ_as_defined():
    # sample 0: 1 token with error 4; sample 1: 3 tokens with error 0 -> token-mean 1, seq-mean 2
    s = torch.zeros(2, 3, 1)
    s[0, 0, 0] = 2.0
    t = torch.zeros_like(s)
    m = torch.tensor([[1, 0, 0], [1, 1, 1]], dtype=torch.bool)
    assert representation_loss(s, t, m).item() == pytest.approx(1.0)
    assert representation_loss(s, t, m, aggregation="seq-mean-token-mean").item() == pytest.approx(2.0)
    assert representation_loss(s, t, m, coef=3.0).item() == pytest.approx(3.0)


def test_global_denominator_makes_shards_sum_to_whole_batch():
    torch.manual_seed(0)
    s = torch.randn(4, 2, 5, 8, requires_grad=True)
    t = torch.randn(4, 2, 5, 8)
    m = torch.rand(4, 5) > 0.3
    whole = representation_loss(s, t, m)
    n = m.sum()
    parts = representation_loss(s[:2], t[:2], m[:2], denominator=n) + representation_loss(
        s[2:], t[2:], m[2:], denominator=n
    )
    assert parts.item() == pytest.approx(whole.item(), rel=1e-6)


def test_rep_loss_gradient_matches_hand_derivation():
    torch.manual_seed(1)
    s = torch.randn(2, 1, 3, 4, requires_grad=True)
    t = torch.randn(2, 1, 3, 4)
    m = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    representation_loss(s, t, m).backward()
    expected = 2.0 / 4 * (s.detach() - t) * m.view(2, 1, 3, 1) / m.sum()
    torch.testing.assert_close(s.grad, expected)


def test_teacher_gets_no_gradient():
    s = torch.randn(1, 2, 3, requires_grad=True)
    t = torch.randn(1, 2, 3, requires_grad=True)
    representation_loss(s, t, torch.ones(1, 2, dtype=torch.bool)).backward()
    assert t.grad is None


@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-mean"])
def test_all_masked_batch_is_finite_zero(aggregation):
    s = torch.randn(2, 3, 4, requires_grad=True)
    m = torch.zeros(2, 3, dtype=torch.bool)
    loss = representation_loss(s, torch.randn(2, 3, 4), m, aggregation=aggregation)
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(loss)
    assert torch.count_nonzero(s.grad) == 0
    lp = torch.randn(2, 3, requires_grad=True)
    z = opd_sampled_token_loss(lp, torch.randn(2, 3), m)
    assert z.item() == 0.0


def test_tv7_sampled_token_value_and_gradient():
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.25]])).requires_grad_(True)
    ids = torch.tensor([0])
    lp = token_logprobs(logits, ids)
    q = torch.log(torch.tensor([0.25]))
    loss = opd_sampled_token_loss(lp, q, torch.ones(1))
    assert loss.item() == pytest.approx(-0.4804530, abs=1e-6)
    loss.backward()
    torch.testing.assert_close(logits.grad, torch.tensor([[0.3465736, -0.1732868, -0.1732868]]))
    # a descent step lowers p(ŷ) (the student over-weights ŷ relative to the teacher)
    p_after = torch.softmax(logits.detach() - 0.1 * logits.grad, -1)[0, 0]
    assert p_after < 0.5


def test_topk_hand_computed():
    # one position, k=2: S = log[.6,.2], T = log[.3,.3]
    s = torch.log(torch.tensor([[[0.6, 0.2]]])).requires_grad_(True)
    t = torch.log(torch.tensor([[[0.3, 0.3]]]))
    m = torch.ones(1, 1)
    w = torch.tensor([0.75, 0.25])  # softmax over the k of log[.6,.2]
    ratio = torch.log(torch.tensor([2.0, 2.0 / 3.0]))
    expected = (ratio * w * s.detach()[0, 0]).sum()
    assert opd_topk_loss(s, t, m).item() == pytest.approx(expected.item(), abs=1e-6)
    expected_none = (ratio * 0.5 * s.detach()[0, 0]).sum()
    assert opd_topk_loss(s, t, m, weight="none").item() == pytest.approx(expected_none.item(), abs=1e-6)
    opd_topk_loss(s, t, m).backward()
    torch.testing.assert_close(s.grad[0, 0], ratio * w)


def test_full_kl_zero_when_equal_and_matches_definition():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 11)
    m = torch.ones(3, 5)
    assert full_vocab_reverse_kl(logits, logits, m).item() == pytest.approx(0.0, abs=1e-6)
    other = torch.randn(3, 5, 11)
    p = torch.softmax(logits, -1)
    manual = (p * (torch.log(p) - torch.log_softmax(other, -1))).sum(-1).mean()
    assert full_vocab_reverse_kl(logits, other, m).item() == pytest.approx(manual.item(), rel=1e-5)


def test_chunked_kl_equals_plain_in_value_and_gradient():
    torch.manual_seed(0)
    n, d, v = 37, 8, 50
    hs = torch.randn(n, d, requires_grad=True)
    ws = torch.randn(v, d, requires_grad=True)
    ht, wt = torch.randn(n, 6), torch.randn(v, 6)
    m = torch.rand(n) > 0.2
    plain = full_vocab_reverse_kl(hs @ ws.t(), ht @ wt.t(), m)
    g_plain = torch.autograd.grad(plain, (hs, ws))
    chunked = full_vocab_reverse_kl_chunked(hs, ws, ht, wt, m, chunk_size=8)
    g_chunk = torch.autograd.grad(chunked, (hs, ws))
    assert chunked.item() == pytest.approx(plain.item(), rel=1e-5)
    for a, b in zip(g_plain, g_chunk, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_combined_is_opd_plus_mu_rep():
    assert combined_loss(torch.tensor(1.5), torch.tensor(2.0), 10.0).item() == pytest.approx(21.5)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="differ in shape"):
        representation_loss(torch.zeros(1, 2, 3), torch.zeros(1, 2, 4), torch.ones(1, 2))
