"""OPRD-Bridge math (oprd-method.md §5.2-5.4, §10.1 item 9): teacher PCA codes, student projectors, the bank.

For each mapped layer pair (student HF index l, teacher HF index φ(l), proportional map Eq. 11):

* **P_T** (teacher side, fixed): the top-r eigenvectors, as rows ``[r, D_T]``, of the sample covariance
  ``(H - μ_T)ᵀ(H - μ_T) / (n - 1)`` of at most ``max_rows`` teacher response rows ``H``; ``μ_T`` is their mean.
  The teacher code is ``z_T = (h_T - μ_T) P_Tᵀ`` (mean-centred).
* **P_S** (student side): ``Linear(D_S, r, bias=False)`` or the small MLP ``D_S -> max(r, 4r) -> GELU -> r``,
  fitted to predict ``z_T`` from ``h_S`` (raw MSE, AdamW), keeping the checkpoint with the best validation
  *subspace cosine* (mean over rows of ``cos(P_S h_S, z_T)``, averaged over layer pairs). ``z_S = P_S h_S`` is
  **not** centred.
* The distillation loss (Stage 2) is the normalized MSE of ``trainer.losses.representation_loss`` on
  ``(z_S, z_T)`` with ``normalize=True``: ``(2 - 2 cos) / r`` per token, token-mean over the selected positions,
  mean over student layers, times the coefficient.

An eigenvector's sign is arbitrary: compare bases through their projectors ``P_Tᵀ P_T``.

A bank is stored as ``bank.safetensors`` (tensors only, no pickle) plus ``bank.json`` (layer pairs, rank,
projector type, sizes, validation cosines, the digests of the models and pairs it was fitted on).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from trainer.config import PositionMode
from trainer.hidden import capture_hidden_states
from trainer.models import CompatibilityError
from trainer.rollout import RolloutBatch

__all__ = [
    "BANK_FILE",
    "BANK_META",
    "BankMeta",
    "BridgeBank",
    "FitResult",
    "check_bank",
    "collect_pair_rows",
    "fit_projectors",
    "load_bank",
    "make_projector",
    "pair_key",
    "pca_basis",
    "save_bank",
    "split_by_sequence",
    "subspace_cosine",
    "teacher_codes",
]

BANK_FILE = "bank.safetensors"
BANK_META = "bank.json"
ProjectorType = Literal["linear", "mlp"]


# ------------------------------------------------------------------------------------------------ teacher
def pca_basis(
    rows: Tensor, rank: int, *, max_rows: int | None = None, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Top-``rank`` principal directions of ``rows``.

    Args:
        rows: ``[N, D]`` teacher states (any float dtype; computed in float64).
        rank: r, ``1 <= r <= D``.
        max_rows: use a uniform sample of at most this many rows (without replacement, from ``generator``).
    Returns:
        ``(basis [r, D], mean [D], eigenvalues [r])`` in fp32: eigenvectors of the sample covariance (divisor
        ``n - 1``) as rows, eigenvalues descending. Each row's sign is arbitrary.
    """
    if rows.dim() != 2:
        raise ValueError(f"pca_basis takes [N, D] rows, got shape {tuple(rows.shape)}")
    n, d = rows.shape
    if not 1 <= rank <= d:
        raise ValueError(f"rank must be in 1..{d} (the teacher hidden size), got {rank}")
    if max_rows is not None and n > max_rows:
        rows = rows[torch.randperm(n, generator=generator)[:max_rows]]
        n = max_rows
    if n < 2:
        raise ValueError(f"PCA needs at least 2 teacher rows, got {n}")
    x = rows.double()
    mean = x.mean(dim=0)
    xc = x - mean
    cov = xc.T @ xc / (n - 1)
    evals, evecs = torch.linalg.eigh(cov)  # ascending
    order = torch.argsort(evals, descending=True)[:rank]
    return evecs[:, order].T.float().contiguous(), mean.float(), evals[order].float()


def teacher_codes(states: Tensor, basis: Tensor, mean: Tensor) -> Tensor:
    """``z_T = (h_T - μ_T) P_Tᵀ``: ``[..., D_T]`` x ``[r, D_T]`` x ``[D_T]`` -> ``[..., r]`` (fp32)."""
    return (states.float() - mean.float()) @ basis.float().T


# ------------------------------------------------------------------------------------------------ student
def make_projector(d_student: int, rank: int, kind: ProjectorType = "linear") -> nn.Module:
    """P_S for one layer pair: ``Linear(D_S, r, bias=False)`` or ``D_S -> max(r, 4r) -> GELU -> r`` (no biases:
    z_S is not centred, so a zero student state maps to a zero code in both forms)."""
    if kind == "linear":
        return nn.Linear(d_student, rank, bias=False)
    if kind == "mlp":
        hidden = max(rank, 4 * rank)
        return nn.Sequential(
            nn.Linear(d_student, hidden, bias=False), nn.GELU(), nn.Linear(hidden, rank, bias=False)
        )
    raise ValueError(f"unknown projector type {kind!r}; use linear or mlp")


def subspace_cosine(z_student: Tensor, z_teacher: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean over rows of ``cos(z_S, z_T)``: ``[N, r]`` (or ``[..., r]`` with a ``[...]`` mask) -> scalar fp32.
    A zero vector has cosine 0 (eps 1e-12, as ``F.normalize``)."""
    cos = F.cosine_similarity(z_student.float(), z_teacher.float(), dim=-1, eps=1e-12)
    if mask is None:
        return cos.mean()
    m = mask.to(cos.dtype)
    return (cos * m).sum() / m.sum().clamp(min=1.0)


def pair_key(student_index: int, teacher_index: int) -> str:
    """Name of a layer pair by HF hidden-state indices (1..L; L = post-final-norm), e.g. ``s4_t6``."""
    return f"s{student_index}_t{teacher_index}"


# ---------------------------------------------------------------------------------------------------- bank
@dataclass
class BankMeta:
    """What a bank was fitted on and how well (``bank.json``)."""

    student_layers: list[int]
    teacher_layers: list[int]
    rank: int
    projector: ProjectorType
    d_student: int
    d_teacher: int
    val_cosine: list[float] = field(default_factory=list)  # per layer pair, best checkpoint
    val_cosine_init: list[float] = field(default_factory=list)  # per layer pair, before fitting
    best_epoch: int = 0
    explained_variance: list[float] = field(
        default_factory=list
    )  # per pair: top-r eigenvalues / total variance
    sources: dict[str, str] = field(default_factory=dict)  # digests: teacher, student, pairs

    @property
    def val_cosine_mean(self) -> float:
        return sum(self.val_cosine) / len(self.val_cosine) if self.val_cosine else float("nan")


class BridgeBank(nn.Module):
    """All layer pairs of one bridge: the frozen teacher bases and means (buffers) and the student projectors.

    ``teacher_bases``: ``[Λ, r, D_T]``; ``teacher_means``: ``[Λ, D_T]``; ``projectors[pair_key(l, φ(l))]``.
    The Λ axis follows ``meta.student_layers`` (the order of the trainer's layer plan).
    """

    def __init__(self, meta: BankMeta):
        super().__init__()
        self.meta = meta
        n = len(meta.student_layers)
        if len(meta.teacher_layers) != n:
            raise ValueError("a bank needs one teacher layer per student layer")
        self.keys = [pair_key(s, t) for s, t in zip(meta.student_layers, meta.teacher_layers, strict=True)]
        self.projectors = nn.ModuleDict(
            {k: make_projector(meta.d_student, meta.rank, meta.projector) for k in self.keys}
        )
        self.register_buffer("teacher_bases", torch.zeros(n, meta.rank, meta.d_teacher))
        self.register_buffer("teacher_means", torch.zeros(n, meta.d_teacher))

    def teacher_codes(self, states: Tensor) -> Tensor:
        """``[B, Λ, W, D_T]`` teacher states -> ``[B, Λ, W, r]`` fp32 codes (constants: no grad)."""
        with torch.no_grad():
            centred = states.float() - self.teacher_means.float()[None, :, None, :]
            return torch.einsum("blwd,lrd->blwr", centred, self.teacher_bases.float())

    def student_codes(self, states: Tensor) -> Tensor:
        """``[B, Λ, W, D_S]`` student states -> ``[B, Λ, W, r]`` codes ``P_S h_S`` (grad flows to the states and,
        when trainable, to the projectors)."""
        if states.shape[1] != len(self.keys):
            raise ValueError(f"states have {states.shape[1]} layers, the bank {len(self.keys)}")
        return torch.stack(
            [self.projectors[k](states[:, i].to(self._dtype())) for i, k in enumerate(self.keys)], dim=1
        )

    def _dtype(self) -> torch.dtype:
        return next(self.projectors.parameters()).dtype

    def check_plan(self, student_layers: Sequence[int], teacher_layers: Sequence[int]) -> None:
        """Refuse a bank fitted for other layer pairs than the run compares."""
        if (
            list(student_layers) != self.meta.student_layers
            or list(teacher_layers) != self.meta.teacher_layers
        ):
            raise ValueError(
                f"the bridge bank was fitted for layer pairs {self.keys}, the run compares "
                f"{[pair_key(s, t) for s, t in zip(student_layers, teacher_layers, strict=True)]}; rerun the "
                "bridge stage (dvc repro bridge) with the same distill.rep.layers"
            )


def check_bank(
    bank: BridgeBank,
    student_layers: Sequence[int],
    teacher_layers: Sequence[int],
    d_student: int,
    d_teacher: int,
    *,
    min_val_cosine: float,
    sources: dict[str, str] | None = None,
) -> None:
    """Pre-flight for ``oprd_bridge``: the bank fits this pair and this plan, and it predicts well enough.

    Raises :class:`~trainer.models.CompatibilityError` when the layer pairs or hidden sizes differ, when a digest
    in ``sources`` (e.g. the teacher's manifest sha256) differs from the one the bank was fitted on, or when the
    mean validation cosine is below ``min_val_cosine``.
    """
    meta = bank.meta
    try:
        bank.check_plan(student_layers, teacher_layers)
    except ValueError as exc:
        raise CompatibilityError(str(exc)) from None
    if (meta.d_student, meta.d_teacher) != (d_student, d_teacher):
        raise CompatibilityError(
            f"the bridge bank maps hidden sizes {meta.d_student} -> {meta.d_teacher}, the models have {d_student} -> "
            f"{d_teacher}; rerun the bridge stage for this teacher/student pair"
        )
    for name, digest in (sources or {}).items():
        fitted = meta.sources.get(name)
        if fitted is not None and digest is not None and fitted != digest:
            raise CompatibilityError(
                f"the bridge bank was fitted on another {name} (sha256 {fitted[:12]}, now {digest[:12]}); rerun the "
                "bridge stage (dvc repro bridge)"
            )
    if not meta.val_cosine_mean >= min_val_cosine:
        per_layer = ", ".join(f"{k}={c:.3f}" for k, c in zip(bank.keys, meta.val_cosine, strict=True))
        raise CompatibilityError(
            f"the bridge's student projectors predict the teacher codes poorly: mean validation cosine "
            f"{meta.val_cosine_mean:.3f} < distill.bridge.min_val_cosine={min_val_cosine} ({per_layer}). Fit on more "
            "pairs (distill.bridge.num_prompts), a lower rank (distill.bridge.rank), more epochs, or the mlp "
            "projector; or use an output-space method (opd_sampled)."
        )


def save_bank(bank: BridgeBank, directory: str | Path) -> Path:
    """Write ``bank.safetensors`` + ``bank.json`` into ``directory``; returns the tensor file."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in bank.state_dict().items()}
    path = directory / BANK_FILE
    save_file(tensors, str(path))
    (directory / BANK_META).write_text(json.dumps(asdict(bank.meta), indent=2, sort_keys=True) + "\n")
    return path


def load_bank(directory: str | Path, device: torch.device | str = "cpu") -> BridgeBank:
    """Load a bank written by :func:`save_bank` (a missing file is a ``FileNotFoundError`` naming the fix)."""
    directory = Path(directory)
    meta_file, tensor_file = directory / BANK_META, directory / BANK_FILE
    if not meta_file.is_file() or not tensor_file.is_file():
        raise FileNotFoundError(
            f"no bridge bank in {directory} ({BANK_META} + {BANK_FILE}); distill.method: oprd_bridge needs the "
            "bridge stage's output: run `dvc repro bridge` (or python -m pipelines.stage_bridge) with the same params"
        )
    meta = BankMeta(**json.loads(meta_file.read_text()))
    bank = BridgeBank(meta)
    bank.load_state_dict(load_file(str(tensor_file)), strict=True)
    return bank.to(device)


# ------------------------------------------------------------------------------------------------ stage 0
@torch.no_grad()
def collect_pair_rows(
    student: nn.Module,
    teacher: nn.Module,
    batch: RolloutBatch,
    student_layers: Sequence[int],
    teacher_layers: Sequence[int],
    *,
    positions: PositionMode = "all",
    k: int = 1,
    chunk: int = 64,
) -> tuple[list[Tensor], list[Tensor], Tensor]:
    """Stage 0: both models on the same on-policy token ids; the selected response rows of every layer pair.

    Returns ``(student_rows, teacher_rows, sequence)``: per layer pair ``[N, D_S]`` and ``[N, D_T]`` fp32 rows
    (N = selected valid response tokens over the batch) and ``[N]`` the row's response index in ``batch`` (for a
    split by whole responses). Runs in chunks of ``chunk`` responses to bound memory.
    """
    hs: list[list[Tensor]] = [[] for _ in student_layers]
    ht: list[list[Tensor]] = [[] for _ in teacher_layers]
    seq: list[Tensor] = []
    n = batch.input_ids.shape[0]
    for start in range(0, n, chunk):
        sl = slice(start, start + chunk)
        args = (
            batch.input_ids[sl],
            batch.attention_mask[sl],
            batch.position_ids[sl],
            batch.response_mask[sl],
        )
        s = capture_hidden_states(student, *args, student_layers, positions, k)
        t = capture_hidden_states(teacher, *args, teacher_layers, positions, k)
        m = s.mask  # [b, W], identical for both (same ids, same selection)
        for i in range(len(student_layers)):
            hs[i].append(s.states[:, i][m].float())
            ht[i].append(t.states[:, i][m].float())
        rows = torch.arange(start, start + m.shape[0]).unsqueeze(1).expand_as(m)
        seq.append(rows[m.cpu()])
    return [torch.cat(x) for x in hs], [torch.cat(x) for x in ht], torch.cat(seq)


def split_by_sequence(sequence: Tensor, val_fraction: float, seed: int) -> Tensor:
    """``[N]`` bool validation mask that holds out ``round(val_fraction * S)`` whole responses (at least one, and
    at least one left for training), chosen with ``seed``."""
    ids = torch.unique(sequence)
    n_val = min(max(1, round(val_fraction * len(ids))), len(ids) - 1)
    if n_val < 1:
        raise ValueError("the bridge fit needs at least 2 responses (one for validation)")
    perm = ids[torch.randperm(len(ids), generator=torch.Generator().manual_seed(seed))]
    return torch.isin(sequence, perm[:n_val])


# ----------------------------------------------------------------------------------------------------- fit
@dataclass
class FitResult:
    bank: BridgeBank
    history: list[dict[str, float]]  # per epoch: train loss, val cosine mean and per layer


def _val_cosines(bank: BridgeBank, hs: list[Tensor], zt: list[Tensor]) -> list[float]:
    with torch.no_grad():
        return [
            subspace_cosine(bank.projectors[k](h), z).item()
            for k, h, z in zip(bank.keys, hs, zt, strict=True)
        ]


def fit_projectors(
    student_rows: Sequence[Tensor],
    teacher_rows: Sequence[Tensor],
    val_rows: Sequence[bool] | Tensor,
    meta: BankMeta,
    *,
    max_pca_rows: int = 16384,
    epochs: int = 20,
    lr: float = 1e-3,
    batch_rows: int = 256,
    seed: int = 42,
) -> FitResult:
    """Stage 1: fit the teacher PCA bases on the training rows, then the student projectors, per layer pair.

    Args:
        student_rows: per layer pair, ``[N, D_S]`` student states at the same N response tokens.
        teacher_rows: per layer pair, ``[N, D_T]`` teacher states (the mapped layer, same tokens).
        val_rows: ``[N]`` bool, True for rows held out (whole responses, so no token leaks across the split).
        meta: layer pairs, rank, projector type, sizes (the fit fills in the cosines and the best epoch).
        epochs, lr, batch_rows, seed: AdamW (wd 0) on the raw MSE ``||P_S h_S - z_T||² / r`` averaged over rows
            and layer pairs; rows shuffled each epoch from ``seed``.
    Returns:
        The bank at the epoch with the best mean validation subspace cosine (epoch 0 = the initialization).
    """
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # projector init
    bank = BridgeBank(meta)
    val = torch.as_tensor(val_rows, dtype=torch.bool)
    train = ~val
    if int(train.sum()) < 2 or int(val.sum()) < 1:
        raise ValueError(
            f"bridge fit needs >= 2 training rows and >= 1 validation row, got {int(train.sum())}/{int(val.sum())}"
        )
    bases, means, explained = [], [], []
    for ht in teacher_rows:
        basis, mean, evals = pca_basis(ht[train], meta.rank, max_rows=max_pca_rows, generator=gen)
        total = torch.var(ht[train].double(), dim=0, unbiased=True).sum().item()
        bases.append(basis)
        means.append(mean)
        explained.append(float(evals.sum().item() / total) if total > 0 else float("nan"))
    with torch.no_grad():
        bank.teacher_bases.copy_(torch.stack(bases))
        bank.teacher_means.copy_(torch.stack(means))
    zt = [teacher_codes(ht, b, m) for ht, b, m in zip(teacher_rows, bases, means, strict=True)]
    hs = [h.float() for h in student_rows]
    hs_tr, zt_tr = [h[train] for h in hs], [z[train] for z in zt]
    hs_va, zt_va = [h[val] for h in hs], [z[val] for z in zt]

    init = _val_cosines(bank, hs_va, zt_va)
    best = (sum(init) / len(init), 0, {k: v.clone() for k, v in bank.state_dict().items()}, init)
    history = [
        {
            "epoch": 0,
            "val_cosine_mean": best[0],
            **{f"val_cosine/{k}": c for k, c in zip(bank.keys, init, strict=True)},
        }
    ]
    opt = torch.optim.AdamW(bank.projectors.parameters(), lr=lr, weight_decay=0.0)
    n = hs_tr[0].shape[0]
    for epoch in range(1, epochs + 1):
        order = torch.randperm(n, generator=gen)
        total, batches = 0.0, 0
        for start in range(0, n, batch_rows):
            idx = order[start : start + batch_rows]
            losses = [
                F.mse_loss(bank.projectors[k](h[idx]), z[idx])
                for k, h, z in zip(bank.keys, hs_tr, zt_tr, strict=True)
            ]
            loss = torch.stack(losses).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item()
            batches += 1
        cos = _val_cosines(bank, hs_va, zt_va)
        mean_cos = sum(cos) / len(cos)
        history.append({"epoch": epoch, "train_mse": total / max(1, batches), "val_cosine_mean": mean_cos,
                        **{f"val_cosine/{k}": c for k, c in zip(bank.keys, cos, strict=True)}})  # fmt: skip
        if mean_cos > best[0] or not math.isfinite(best[0]):
            best = (mean_cos, epoch, {k: v.clone() for k, v in bank.state_dict().items()}, cos)
    bank.load_state_dict(best[2])
    bank.meta.val_cosine = [float(c) for c in best[3]]
    bank.meta.val_cosine_init = [float(c) for c in init]
    bank.meta.best_epoch = best[1]
    bank.meta.explained_variance = explained
    return FitResult(bank=bank, history=history)
