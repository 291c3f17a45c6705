"""The teacher behind one interface: "hidden states / log-probs of these token ids", in-process or remote.

:class:`TeacherRequest` says what one micro-batch needs from the teacher: the planned HF layer indices, the
position mode and ``k`` (compaction happens on the teacher's side), and optionally token ids at which to return the
teacher's log-probs (``[B, R]`` sampled tokens, or ``[B, R, k]`` the student's top-k ids). :func:`answer` computes
the :class:`TeacherReply` with exactly the functions the in-process objective uses
(:func:`trainer.hidden.capture_hidden_states`, :func:`trainer.losses.token_logprobs`), so a replica's answer is
bitwise the local one on the same device, dtype and thread count.

What crosses the wire per micro-batch is therefore only ``[B, Λ, W, D]`` states in the teacher's compute dtype,
a ``[B, W]`` mask and ``[B, R]`` / ``[B, R, k]`` fp32 log-probs; never logits (``[B, R, V]``), never the
uncompacted ``[B, Λ, R, D]`` states. :func:`reply_nbytes` measures it; :func:`reference_nbytes` is the reference's
layout (fp32 states at every selected position, all planned layers) for the same selection.

Backends (:class:`TeacherBackend`): :class:`LocalTeacher` (an ``nn.Module`` in this process; what each Ray replica
runs) and :class:`trainer.teacher_pool.TeacherPool` (Ray actors). ``submit`` returns a :class:`PendingReply` at
once; ``result()`` blocks. The trainer's ``teacher.placement: local`` path does not go through this module at all:
it keeps passing the module to :meth:`trainer.objectives.Objective.prepare` unchanged.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from trainer.config import PositionMode
from trainer.export import MANIFEST_NAME, hash_directory, manifest_digest
from trainer.hidden import capture_hidden_states, layer_indices, num_decoder_layers
from trainer.losses import token_logprobs

__all__ = [
    "LocalTeacher",
    "PendingReply",
    "TeacherBackend",
    "TeacherIdentity",
    "TeacherMismatchError",
    "TeacherReply",
    "TeacherRequest",
    "answer",
    "reference_nbytes",
    "reply_nbytes",
    "teacher_digest",
    "teacher_identity",
]


class TeacherMismatchError(RuntimeError):
    """The teacher that answers is not the one the run planned for (other weights, depth or layer plan).

    Never retried: a re-sent request would meet the same teacher."""


@dataclass(frozen=True)
class TeacherIdentity:
    """What a request is checked against on every call: the teacher directory's manifest sha256 and its shape.

    ``manifest_sha256``: the ``manifest.json`` digest format of :mod:`trainer.export` over the directory's files.
    """

    manifest_sha256: str
    num_layers: int
    hidden_size: int


@dataclass(frozen=True)
class TeacherRequest:
    """What the teacher computes for one micro-batch (shapes: B rows, R response slots).

    ``layers``: teacher HF indices (1..L, L post-final-norm) whose states to return; empty = no states.
    ``positions``/``k``: :func:`trainer.hidden.select_positions` semantics; compaction runs on the teacher's side.
    ``logprob_ids``: ``[B, R]`` or ``[B, R, k]`` ids; the reply's ``logprobs`` are log softmax(logits /
    ``temperature``) gathered there (fp32). ``None`` = no logits are computed at all (OPRD).
    ``identity``: the teacher the caller planned for; a replica refuses a request whose identity is not its own.
    ``compute_dtype``: ``"bfloat16"`` runs the pass under bf16 autocast (states come back in bf16), ``None`` in the
    weights' dtype.
    """

    layers: tuple[int, ...]
    positions: PositionMode = "last"
    k: int = 1
    logprob_ids: Tensor | None = None
    temperature: float = 1.0
    identity: TeacherIdentity | None = None
    compute_dtype: str | None = None


@dataclass
class TeacherReply:
    """``states``: ``[B, Λ, W, D]`` compute dtype (or ``None``); ``mask``: ``[B, W]`` bool; ``logprobs``: ``[B, R]``
    or ``[B, R, k]`` fp32 (or ``None``)."""

    states: Tensor | None = None
    mask: Tensor | None = None
    logprobs: Tensor | None = None
    meta: dict = field(default_factory=dict)


def reply_nbytes(reply: TeacherReply) -> int:
    """Bytes of the reply's tensors (what crosses the wire from a replica, payload only)."""
    return sum(
        t.numel() * t.element_size() for t in (reply.states, reply.mask, reply.logprobs) if t is not None
    )


def reference_nbytes(selected_positions: int, layers: int, hidden: int) -> int:
    """The reference's transfer for the same selection: fp32 states at every selected position, all planned layers
    (oprd-method.md §10.1 item 10; the OPRD reference moves fp32 hidden states over Ray)."""
    return int(selected_positions) * int(layers) * int(hidden) * 4


@runtime_checkable
class PendingReply(Protocol):
    def result(self) -> TeacherReply: ...


@runtime_checkable
class TeacherBackend(Protocol):
    """``submit(input_ids, attention_mask, position_ids, response_mask, request)`` -> :class:`PendingReply`.

    Tensors are ``[B, P+R]`` (``response_mask`` ``[B, R]``), on any device; the reply comes back on CPU for a
    remote backend. ``identity`` is the teacher this backend serves; ``stats`` the cumulative counters
    (``requests``, ``reply_bytes``, ``request_bytes``, ``retries``)."""

    identity: TeacherIdentity
    stats: dict[str, float]

    def submit(
        self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor, response_mask: Tensor,
        request: TeacherRequest,
    ) -> PendingReply: ...  # fmt: skip


def teacher_digest(path: str | Path, *, trust_manifest: bool = True) -> str:
    """The manifest sha256 of a teacher directory: ``manifest.json``'s ``sha256`` when present and
    ``trust_manifest``, else computed over the files (:func:`trainer.export.hash_directory`). A replica computes it
    from the files it actually loaded (``trust_manifest=False``), so a stale manifest is caught as a mismatch."""
    p = Path(path)
    if trust_manifest and (p / MANIFEST_NAME).is_file():
        try:
            return str(json.loads((p / MANIFEST_NAME).read_text())["sha256"])
        except (ValueError, KeyError):
            pass
    return manifest_digest(hash_directory(p))


def teacher_identity(path: str | Path, model: nn.Module) -> TeacherIdentity:
    """The identity the ranks plan for: ``path``'s manifest digest and ``model``'s depth and hidden size
    (``model`` may live on the meta device: only its config and module tree are read)."""
    return TeacherIdentity(teacher_digest(path), num_decoder_layers(model), int(model.config.hidden_size))


def check_request(request: TeacherRequest, identity: TeacherIdentity) -> None:
    """Raise :class:`TeacherMismatchError` unless ``request`` was planned for ``identity`` and its layers exist."""
    want = request.identity
    if want is not None and want != identity:
        raise TeacherMismatchError(
            f"teacher mismatch: the request was planned for {want}, this replica serves {identity}; every replica "
            "must load the teacher the ranks checked (same directory contents)"
        )
    try:
        layer_indices(identity.num_layers, list(request.layers))
    except ValueError as exc:
        raise TeacherMismatchError(
            f"layer plan {list(request.layers)} does not fit this teacher: {exc}"
        ) from None


@torch.no_grad()
def answer(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    position_ids: Tensor,
    response_mask: Tensor,
    request: TeacherRequest,
) -> TeacherReply:
    """The teacher pass of one request: the selected (compacted) states and/or log-probs at the given ids.

    Numerically the objective's in-process pass: same capture call, same autocast, same compute-dtype cast.
    """
    from trainer.objectives import _compute_dtype  # the one definition of "the teacher's compute dtype"

    dev = input_ids.device.type
    ctx = (
        torch.autocast(device_type=dev, dtype=torch.bfloat16)
        if request.compute_dtype == "bfloat16"
        else nullcontext()
    )
    want_logits = request.logprob_ids is not None
    layers: Sequence[int] = request.layers or (num_decoder_layers(model),)
    positions = request.positions if request.layers else "last"
    with ctx:
        t = capture_hidden_states(
            model, input_ids, attention_mask, position_ids, response_mask, list(layers), positions, request.k,
            with_logits=want_logits,
        )  # fmt: skip
        reply = TeacherReply()
        if request.layers:
            reply.states, reply.mask = _compute_dtype(t.states), t.mask
        if want_logits:
            reply.logprobs = token_logprobs(
                t.logits, request.logprob_ids.to(t.logits.device), request.temperature
            )
    return reply


class _Done:
    def __init__(self, reply: TeacherReply):
        self._reply = reply

    def result(self) -> TeacherReply:
        return self._reply


class LocalTeacher:
    """:class:`TeacherBackend` over a module in this process (computed at ``submit``; no copies, no transfer).

    ``identity`` defaults to the module's shape with an empty digest (the module is the caller's own)."""

    def __init__(self, model: nn.Module, identity: TeacherIdentity | None = None):
        self.model = model
        self.identity = identity or TeacherIdentity(
            manifest_sha256="",
            num_layers=num_decoder_layers(model),
            hidden_size=int(model.config.hidden_size),
        )
        self.stats: dict[str, float] = {"requests": 0, "reply_bytes": 0, "request_bytes": 0, "retries": 0}

    def submit(self, input_ids, attention_mask, position_ids, response_mask, request) -> PendingReply:
        check_request(request, self.identity)
        reply = answer(self.model, input_ids, attention_mask, position_ids, response_mask, request)
        self.stats["requests"] += 1
        self.stats["reply_bytes"] += reply_nbytes(reply)
        return _Done(reply)
