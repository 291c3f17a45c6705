"""OPRD-Bridge math against hand-computed cases (oprd-method.md §5.3-5.4, §10.1 item 9) and autograd."""

from __future__ import annotations

import math

import pytest
import torch

from trainer.bridge import (
    BankMeta,
    BridgeBank,
    fit_projectors,
    load_bank,
    make_projector,
    pca_basis,
    save_bank,
    split_by_sequence,
    subspace_cosine,
    teacher_codes,
)
from trainer.losses import representation_loss


def _projector(basis: torch.Tensor) -> torch.Tensor:
    """P^T P: the orthogonal projector onto the span of the basis rows (sign-free)."""
    return basis.T @ basis


def test_pca_hand_case_uses_n_minus_1_and_the_mean():
    # Rows around (3, -2): x spreads ±1, y spreads ±0.5. Sum of squares: x 2, y 0.5; n - 1 = 3.
    rows = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 0.5], [0.0, -0.5]]) + torch.tensor([3.0, -2.0])
    basis, mean, evals = pca_basis(rows, 1)
    assert mean.tolist() == pytest.approx([3.0, -2.0])
    assert evals.tolist() == pytest.approx([2.0 / 3.0])  # the population divisor n would give 0.5
    assert _projector(basis).tolist() == [
        pytest.approx([1.0, 0.0], abs=1e-6),
        pytest.approx([0.0, 0.0], abs=1e-6),
    ]
    full, _, evals2 = pca_basis(rows, 2)
    assert evals2.tolist() == pytest.approx([2.0 / 3.0, 0.5 / 3.0])
    assert torch.allclose(full @ full.T, torch.eye(2), atol=1e-6)  # orthonormal rows
    # z_T = (h - mu) P^T: the point (4, -2) sits +1 along x; its code is ±1 (sign of the eigenvector).
    z = teacher_codes(torch.tensor([[4.0, -2.0]]), basis, mean)
    assert abs(z.item()) == pytest.approx(1.0)


def test_pca_recovers_a_planted_subspace_sign_free():
    g = torch.Generator().manual_seed(0)
    # 3-D data with a dominant plane spanned by u, v (variances 25 and 9) and small noise (variance 0.01).
    u = torch.tensor([1.0, 1.0, 0.0]) / math.sqrt(2)
    v = torch.tensor([0.0, 0.0, 1.0])
    coef = torch.randn(4000, 2, generator=g) * torch.tensor([5.0, 3.0])
    rows = coef[:, :1] * u + coef[:, 1:] * v + 0.1 * torch.randn(4000, 3, generator=g)
    basis, _, evals = pca_basis(rows, 2)
    planted = torch.stack([u, v])
    assert torch.allclose(_projector(basis), _projector(planted), atol=0.01)
    assert evals[0] > evals[1] > 1.0
    # Subsampling keeps at most max_rows rows and still finds the plane.
    sub, _, _ = pca_basis(rows, 2, max_rows=500, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(_projector(sub), _projector(planted), atol=0.05)


def test_pca_rejects_bad_rank():
    with pytest.raises(ValueError, match=r"rank must be in 1\.\.2"):
        pca_basis(torch.randn(5, 2), 3)


def test_projector_shapes_and_no_bias():
    lin = make_projector(6, 4, "linear")
    assert lin.weight.shape == (4, 6) and lin.bias is None
    mlp = make_projector(6, 4, "mlp")
    assert [m.weight.shape for m in mlp if isinstance(m, torch.nn.Linear)] == [(16, 6), (4, 16)]
    assert all(m.bias is None for m in mlp if isinstance(m, torch.nn.Linear))
    assert make_projector(6, 1, "mlp")[0].weight.shape == (4, 6)  # max(r, 4r)


def test_subspace_cosine_hand_case():
    zs = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    zt = torch.tensor([[2.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    assert subspace_cosine(zs, zt).item() == pytest.approx((1.0 + 0.0 + 0.0) / 3)  # a zero code counts as 0
    assert subspace_cosine(zs, zt, torch.tensor([1, 1, 0])).item() == pytest.approx(0.5)


def _bank(d_s=2, d_t=2, r=2, layers=((1, 1),)) -> BridgeBank:
    meta = BankMeta([s for s, _ in layers], [t for _, t in layers], r, "linear", d_s, d_t)
    return BridgeBank(meta)


def test_bank_codes_and_loss_match_tv3_head():
    # Identity projector and basis, zero mean: z = h. TV3 (normalized): per-token [1.0, 0.2929] -> 0.6464466.
    bank = _bank()
    with torch.no_grad():
        bank.projectors["s1_t1"].weight.copy_(torch.eye(2))
        bank.teacher_bases.copy_(torch.eye(2)[None])
    hs = torch.tensor([[[0.0, 1.0], [1.0, 1.0]]])[:, None]  # [B=1, Λ=1, W=2, D=2]
    ht = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])[:, None]
    zs, zt = bank.student_codes(hs), bank.teacher_codes(ht)
    loss = representation_loss(zs, zt, torch.ones(1, 2), normalize=True)
    assert loss.item() == pytest.approx(0.6464466, abs=1e-6)
    # Mean over layers and the coefficient: two identical layers, coef 10.
    bank2 = _bank(layers=((1, 1), (2, 3)))
    with torch.no_grad():
        for k in bank2.keys:
            bank2.projectors[k].weight.copy_(torch.eye(2))
        bank2.teacher_bases.copy_(torch.eye(2).expand(2, 2, 2))
    hs2, ht2 = hs.expand(1, 2, 2, 2), ht.expand(1, 2, 2, 2)
    loss2 = representation_loss(
        bank2.student_codes(hs2), bank2.teacher_codes(ht2), torch.ones(1, 2), normalize=True, coef=10.0
    )
    assert loss2.item() == pytest.approx(6.464466, abs=1e-5)


def test_bank_teacher_codes_are_centred_and_student_codes_are_not():
    bank = _bank(d_s=2, d_t=3, r=1)
    with torch.no_grad():
        bank.projectors["s1_t1"].weight.copy_(torch.tensor([[1.0, 0.0]]))
        bank.teacher_bases.copy_(torch.tensor([[[0.0, 1.0, 0.0]]]))
        bank.teacher_means.copy_(torch.tensor([[5.0, 5.0, 5.0]]))
    zt = bank.teacher_codes(torch.tensor([5.0, 7.0, 0.0]).view(1, 1, 1, 3))
    assert zt.item() == pytest.approx(2.0)
    zs = bank.student_codes(torch.tensor([3.0, 9.0]).view(1, 1, 1, 2))
    assert zs.item() == pytest.approx(3.0)


def test_bridge_loss_gradient_matches_closed_form():
    """d/dh_S of (2 - 2 cos(P h, z_T)) / r, token-mean: -(2/r) P^T (ẑ_T - cos ẑ_S) / ||z_S|| / N."""
    torch.manual_seed(0)
    r, d = 3, 5
    bank = _bank(d_s=d, d_t=4, r=r)
    bank.requires_grad_(False)  # frozen P_S: the gradient reaches the student states only
    w = bank.projectors["s1_t1"].weight
    hs = torch.randn(1, 1, 2, d, requires_grad=True)
    zt = torch.randn(1, 1, 2, r)
    loss = representation_loss(bank.student_codes(hs), zt, torch.ones(1, 2), normalize=True)
    loss.backward()
    zs = (hs.detach() @ w.T)[0, 0]
    expected = []
    for i in range(2):
        zhat, that = zs[i] / zs[i].norm(), zt[0, 0, i] / zt[0, 0, i].norm()
        cos = (zhat * that).sum()
        dz = -(2.0 / r) * (that - cos * zhat) / zs[i].norm() / 2  # token-mean over 2 tokens
        expected.append(w.T @ dz)
    assert torch.allclose(hs.grad[0, 0], torch.stack(expected), atol=1e-6)
    assert w.grad is None
    # And a finite-difference check in float64 of the whole path (codes + normalized loss).
    bank64 = bank.double()

    def f(h):
        z_s = bank64.student_codes(h)
        z_s = torch.nn.functional.normalize(z_s, dim=-1, eps=1e-12)
        z_t = torch.nn.functional.normalize(zt.double(), dim=-1, eps=1e-12)
        return (z_s - z_t).pow(2).mean(-1).mean()

    assert torch.autograd.gradcheck(f, (hs.detach().double().requires_grad_(True),))


def test_trainable_projector_gets_gradient():
    bank = _bank(d_s=3, d_t=3, r=2)
    hs = torch.randn(1, 1, 2, 3)
    loss = representation_loss(
        bank.student_codes(hs), torch.randn(1, 1, 2, 2), torch.ones(1, 2), normalize=True
    )
    loss.backward()
    assert bank.projectors["s1_t1"].weight.grad is not None
    assert bank.teacher_bases.grad is None  # a buffer, never trained


def test_fit_recovers_a_linear_bridge_and_keeps_the_best_epoch():
    g = torch.Generator().manual_seed(0)
    n, d_s, d_t, r = 3000, 6, 10, 3
    hs = torch.randn(n, d_s, generator=g)
    mix = torch.randn(d_s, d_t, generator=g)
    ht = hs @ mix + 4.0 + 0.01 * torch.randn(n, d_t, generator=g)  # teacher = linear map + offset
    seq = torch.arange(n) // 10  # 300 "responses" of 10 rows
    val = split_by_sequence(seq, 0.1, seed=0)
    assert 0 < val.sum() < n and (val.view(-1, 10).all(1) | ~val.view(-1, 10).any(1)).all()  # whole responses
    meta = BankMeta([2], [3], r, "linear", d_s, d_t)
    res = fit_projectors([hs], [ht], val, meta, epochs=30, lr=3e-2, batch_rows=128, seed=0)
    bank = res.bank
    assert bank.meta.val_cosine[0] > 0.99
    assert abs(bank.meta.val_cosine_init[0]) < 0.5
    assert bank.meta.best_epoch > 0
    best = max(h["val_cosine_mean"] for h in res.history)
    assert bank.meta.val_cosine_mean == pytest.approx(best)
    # The stored bank reproduces the recorded validation cosine.
    with torch.no_grad():
        zs = bank.projectors["s2_t3"](hs[val])
        zt = teacher_codes(ht[val], bank.teacher_bases[0], bank.teacher_means[0])
    assert subspace_cosine(zs, zt).item() == pytest.approx(bank.meta.val_cosine[0], abs=1e-6)
    # PCA on the training rows: the basis spans the top-r principal subspace of the teacher rows.
    ref, _, _ = pca_basis(ht[~val], r)
    assert torch.allclose(_projector(bank.teacher_bases[0]), _projector(ref), atol=1e-4)


def test_save_load_roundtrip_and_missing_bank(tmp_path):
    bank = _bank(d_s=3, d_t=4, r=2, layers=((1, 1), (2, 3)))
    bank.meta.val_cosine = [0.9, 0.8]
    with torch.no_grad():
        bank.teacher_bases.normal_()
        bank.teacher_means.normal_()
    save_bank(bank, tmp_path / "b")
    back = load_bank(tmp_path / "b")
    for k, v in bank.state_dict().items():
        assert torch.equal(v, back.state_dict()[k])
    assert back.meta.val_cosine_mean == pytest.approx(0.85)
    with pytest.raises(FileNotFoundError, match="bridge stage"):
        load_bank(tmp_path / "nothing")
    with pytest.raises(ValueError, match="fitted for layer pairs"):
        back.check_plan([1, 2], [1, 2])
    back.check_plan([1, 2], [1, 3])
