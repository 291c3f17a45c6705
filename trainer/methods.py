"""What each distillation method needs: the one table every consumer reads (objective, trainer, pre-flight).

==============  =============  ==============  ============  =====  ==========
method          hidden states  teacher logits  old log-prob  top-k  full vocab
==============  =============  ==============  ============  =====  ==========
``oprd``        yes            no              no            no     no
``opd_sampled`` no             yes             yes           no     no
``opd_topk``    no             yes             yes           yes    no
``full_kl``     no             yes             no            no     yes
``combined``    yes            yes             yes           no     no
``oprd_bridge`` via bank       no              no            no     no
==============  =============  ==============  ============  =====  ==========

``oprd_bridge`` compares r-dim codes of the hidden states through a fitted bank (``bridge``: the bridge stage
must run first). Its ``hidden_states`` is False: the states are not compared *directly*, so hidden sizes may differ
and the direct alignment pre-flight does not apply (the bank has its own, :func:`trainer.bridge.check_bank`).

Standard library only: configuration validation and light-weight consumers import it without torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

__all__ = ["METHODS", "Method", "MethodSpec", "method_spec"]

Method = Literal["oprd", "opd_sampled", "opd_topk", "full_kl", "combined", "oprd_bridge"]


@dataclass(frozen=True)
class MethodSpec:
    """The passes and inputs a method's loss needs (oprd-method.md §1.1, §4)."""

    name: str
    hidden_states: bool
    """The loss compares selected student/teacher hidden states: same hidden size required, alignment pre-flight
    applies, and per-layer cosines come for free."""
    teacher_logits: bool
    """The teacher pass produces output-space targets (log q at sampled / top-k ids, or full-vocabulary)."""
    old_logprobs: bool
    """A no-grad student pass for old log-probs (the reference's ``compute_log_prob``) precedes the update."""
    top_k: bool
    """The OPD term is over the student's top-k ids (``distill.opd.top_k``) instead of the sampled token."""
    full_vocab: bool
    """The loss is the full-vocabulary reverse KL (teacher logits or final states + LM head)."""
    bridge: bool = False
    """The hidden states are compared through the OPRD-Bridge bank (r-dim codes); the ``bridge`` stage fits it."""

    @property
    def sampled_token(self) -> bool:
        """The OPD term is the sampled-token (top-1) estimator."""
        return self.old_logprobs and not self.top_k


METHODS: dict[str, MethodSpec] = {
    s.name: s
    for s in (
        MethodSpec("oprd", hidden_states=True, teacher_logits=False, old_logprobs=False, top_k=False, full_vocab=False),
        MethodSpec("opd_sampled", hidden_states=False, teacher_logits=True, old_logprobs=True, top_k=False,
                   full_vocab=False),
        MethodSpec("opd_topk", hidden_states=False, teacher_logits=True, old_logprobs=True, top_k=True,
                   full_vocab=False),
        MethodSpec("full_kl", hidden_states=False, teacher_logits=True, old_logprobs=False, top_k=False,
                   full_vocab=True),
        MethodSpec("combined", hidden_states=True, teacher_logits=True, old_logprobs=True, top_k=False,
                   full_vocab=False),
        MethodSpec("oprd_bridge", hidden_states=False, teacher_logits=False, old_logprobs=False, top_k=False,
                   full_vocab=False, bridge=True),
    )
}  # fmt: skip
assert set(METHODS) == set(get_args(Method)), "every configurable method has a row"


def method_spec(method: str) -> MethodSpec:
    """The row of ``method``; ``ValueError`` naming the known methods otherwise."""
    try:
        return METHODS[method]
    except KeyError:
        raise ValueError(f"unknown distill.method {method!r}; one of {', '.join(METHODS)}") from None
