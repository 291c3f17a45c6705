"""Loading teacher and student, and the pre-flight compatibility check.

Models come from local Hugging Face directories, safetensors only (``use_safetensors=True``: a directory that has
only pickled weights is refused rather than unpickled), with ``trust_remote_code`` off unless configured. Nothing
is fetched from a hub: a path that does not exist is an error that says so.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from trainer.config import ModelsConfig, ModelSource, RepConfig
from trainer.hidden import layer_indices, num_decoder_layers, teacher_layer_indices

__all__ = ["CompatibilityError", "LayerPlan", "check_compatibility", "load_model", "load_tokenizer"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class CompatibilityError(ValueError):
    """Teacher and student cannot be distilled as configured; the message says what to change."""


def _check_dir(path: Path, what: str) -> None:
    if not path.is_dir():
        raise FileNotFoundError(
            f"{what} directory not found: {path} (set models.{what}.path in params.yaml to a local Hugging Face "
            "model directory, or keep models.embedded: true so the bootstrap stage builds one)"
        )
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{what} directory {path} has no config.json: not a Hugging Face model directory"
        )
    if not any(path.glob("*.safetensors")):
        raise FileNotFoundError(
            f"{what} directory {path} has no *.safetensors weights; oprd-ci loads safetensors only "
            "(convert pickled checkpoints with `transformers` save_pretrained(safe_serialization=True))"
        )


def load_model(source: ModelSource, cfg: ModelsConfig, *, role: str, trainable: bool) -> PreTrainedModel:
    """Load a CausalLM from ``source.path``. The teacher (``trainable=False``) is frozen and in eval mode;
    the student is returned in train mode with fp32 master weights."""
    path = Path(source.path)
    _check_dir(path, role)
    dtype = torch.float32 if trainable else _DTYPES[cfg.dtype]
    model = AutoModelForCausalLM.from_pretrained(
        path, use_safetensors=True, trust_remote_code=cfg.trust_remote_code, dtype=dtype
    )
    if trainable:
        model.train()
    else:
        model.eval().requires_grad_(False)
    return model


GENERIC_TOKENIZER_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")


def load_tokenizer(path: str | Path, cfg: ModelsConfig | None = None) -> PreTrainedTokenizerBase:
    """The tokenizer of a model directory, honouring the class its ``tokenizer_config.json`` declares.

    transformers 5's ``AutoTokenizer`` picks the class from ``config.json``'s ``model_type`` even when the
    directory declares the generic fast tokenizer: a custom ``tokenizer.json`` saved next to a Qwen2 config then
    loads as ``Qwen2Tokenizer``, which re-splits text with Qwen's pre-tokenizer (different ids) and appends
    ``<|endoftext|>``. When the declared class is generic, the ``tokenizer.json`` is loaded as is.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"tokenizer directory not found: {path} (set models.tokenizer)")
    trust = cfg.trust_remote_code if cfg is not None else False
    config_file = path / "tokenizer_config.json"
    declared = json.loads(config_file.read_text()).get("tokenizer_class") if config_file.is_file() else None
    if declared in GENERIC_TOKENIZER_CLASSES and (path / "tokenizer.json").is_file():
        return PreTrainedTokenizerFast.from_pretrained(path)
    return AutoTokenizer.from_pretrained(path, trust_remote_code=trust)


@dataclass(frozen=True)
class LayerPlan:
    """Which HF hidden-state indices are compared: ``student[i]`` is matched with ``teacher[i]``."""

    student: list[int]
    teacher: list[int]
    notes: list[str] = field(default_factory=list)


def _vocab(tok: PreTrainedTokenizerBase) -> dict[str, int]:
    return dict(tok.get_vocab())


def check_compatibility(
    student: nn.Module,
    teacher: nn.Module,
    student_tok: PreTrainedTokenizerBase,
    teacher_tok: PreTrainedTokenizerBase,
    rep: RepConfig,
    *,
    uses_hidden_states: bool,
) -> LayerPlan:
    """Pre-flight: tokenizer identity, vocabulary size, depth (proportional map) and hidden size.

    ``uses_hidden_states``: the method compares hidden states *directly* (``oprd``, ``combined``), so the hidden
    sizes must match; ``oprd_bridge`` compares them through its bank and passes False (its bank is checked by
    :func:`trainer.bridge.check_bank`). Tokenizers must match for every method, the bridge included.

    OPRD-Vanilla and the OPD baselines feed the student's token ids to the teacher unchanged, so both must read
    ids the same way. Raises :class:`CompatibilityError` naming the mismatch and the fix.
    """
    sv, tv = _vocab(student_tok), _vocab(teacher_tok)
    if sv != tv:
        only_s = sorted(set(sv.items()) - set(tv.items()))[:3]
        raise CompatibilityError(
            f"tokenizers differ ({len(sv)} vs {len(tv)} entries; e.g. student-only {only_s}): the teacher is fed the "
            "student's token ids, so both need the same tokenizer. Pick a teacher of the student's tokenizer family."
        )
    s_cfg, t_cfg = student.config, teacher.config
    if t_cfg.vocab_size < len(sv) or s_cfg.vocab_size < len(sv):
        raise CompatibilityError(
            f"embedding tables too small for the tokenizer ({len(sv)} ids): student {s_cfg.vocab_size}, "
            f"teacher {t_cfg.vocab_size}"
        )
    n_s, n_t = num_decoder_layers(student), num_decoder_layers(teacher)
    s_layers = layer_indices(n_s, rep.layers)
    notes = []
    if n_s != n_t:
        notes.append(f"depths differ (student {n_s}, teacher {n_t}): proportional layer map (Eq. 11)")
    t_layers = teacher_layer_indices(s_layers, n_s, n_t)
    if uses_hidden_states and s_cfg.hidden_size != t_cfg.hidden_size:
        raise CompatibilityError(
            f"hidden sizes differ (student {s_cfg.hidden_size}, teacher {t_cfg.hidden_size}): vanilla OPRD compares "
            "hidden states directly. Use distill.method: oprd_bridge (a fitted low-rank bridge between the two "
            "hidden spaces), an output-space method (opd_sampled or opd_topk), or a teacher with the student's "
            "hidden size."
        )
    return LayerPlan(student=s_layers, teacher=t_layers, notes=notes)
