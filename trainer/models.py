"""Loading teacher and student, and the pre-flight compatibility check.

Models come from local Hugging Face directories, safetensors only (``use_safetensors=True``: a directory that has
only pickled weights is refused rather than unpickled), with ``trust_remote_code`` off unless configured. Nothing
is fetched from a hub: a path that does not exist is an error that says so.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tokenizers import Tokenizer
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from trainer.config import ModelsConfig, ModelSource, RepConfig
from trainer.hidden import layer_indices, num_decoder_layers, teacher_layer_indices

__all__ = [
    "CompatibilityError",
    "LayerPlan",
    "check_compatibility",
    "check_pair",
    "copy_tokenizer_files",
    "has_tokenizer",
    "load_model",
    "load_tokenizer",
    "meta_model",
]

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


_PROBE_IDS = 512
"""How many vocabulary ids (spread over the whole vocabulary) the tokenizer fidelity probe decodes and re-encodes."""


def load_tokenizer(path: str | Path, cfg: ModelsConfig | None = None) -> PreTrainedTokenizerBase:
    """The tokenizer of a model directory, loaded with stock ``AutoTokenizer``, and checked against its files.

    transformers 5 picks the tokenizer class from ``config.json``'s ``model_type`` for some families (``qwen2``
    among them) and rebuilds the vocabulary with that family's pre-tokenizer, whatever ``tokenizer.json`` says.
    For a custom ``tokenizer.json`` that silently changes the ids (the embedded task's tokenizer avoids it, see
    ``pipelines.task.build_tokenizer``). So when a ``tokenizer.json`` is present, a probe text (ids spread over
    the vocabulary, decoded by the file's own pipeline) must encode to the same ids through ``AutoTokenizer``
    as through the file; otherwise this raises instead of training or evaluating on different ids.

    Raises:
        FileNotFoundError: ``path`` is not a directory.
        CompatibilityError: stock loading disagrees with the directory's ``tokenizer.json``.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"tokenizer directory not found: {path} (set models.tokenizer)")
    trust = cfg.trust_remote_code if cfg is not None else False
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust)
    if (path / "tokenizer.json").is_file():
        _check_tokenizer_fidelity(tok, path)
    return tok


def _check_tokenizer_fidelity(tok: PreTrainedTokenizerBase, path: Path) -> None:
    raw = Tokenizer.from_file(str(path / "tokenizer.json"))
    size = raw.get_vocab_size(with_added_tokens=True)
    special = {t.content for t in raw.get_added_tokens_decoder().values() if t.special}
    ids = [i for i in range(0, size, max(1, size // _PROBE_IDS)) if raw.id_to_token(i) not in special]
    probe = raw.decode(ids)
    expected = raw.encode(probe, add_special_tokens=False).ids
    # verbose=False: the probe is longer than a small model's context on purpose (it spans the vocabulary); it is
    # never run through the model, so transformers' "longer than the maximum sequence length" warning is noise.
    got = tok(probe, add_special_tokens=False, verbose=False)["input_ids"]
    if got != expected:
        at = next(
            (i for i, (a, b) in enumerate(zip(got, expected, strict=False)) if a != b),
            min(len(got), len(expected)),
        )
        got, expected = got[at : at + 8], expected[at : at + 8]
        raise CompatibilityError(
            f"{path}: AutoTokenizer loads this directory as {type(tok).__name__}, which tokenizes differently "
            f"from its tokenizer.json (from id position {at}: {got} instead of {expected}). Re-save the "
            "tokenizer so stock loading is exact (for a custom vocabulary on a model type with its own tokenizer "
            "class: declare the symbols that class would split as added tokens)."
        )


TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
)
"""The files a Hugging Face tokenizer directory may consist of (transformers 4 and 5 layouts)."""


def copy_tokenizer_files(src: str | Path, dst: str | Path) -> list[str]:
    """Copy the tokenizer files of ``src`` byte for byte into ``dst``; returns the names copied.

    An exported student carries exactly its base's tokenizer (what :func:`load_tokenizer` checked), rather than
    a re-serialization through whatever class ``AutoTokenizer`` picked, which can rewrite the pipeline.
    """
    copied = []
    for name in TOKENIZER_FILES:
        if (Path(src) / name).is_file():
            shutil.copy2(Path(src) / name, Path(dst) / name)
            copied.append(name)
    return copied


@dataclass(frozen=True)
class LayerPlan:
    """Which HF hidden-state indices are compared: ``student[i]`` is matched with ``teacher[i]``."""

    student: list[int]
    teacher: list[int]
    notes: list[str] = field(default_factory=list)


def _vocab(tok: PreTrainedTokenizerBase) -> dict[str, int]:
    return dict(tok.get_vocab())


def _special_tokens(tok: PreTrainedTokenizerBase) -> dict[str, str]:
    """Role -> token of the special tokens (bos/eos/pad/unk/...; additional ones under their own names): two
    tokenizers with one vocabulary can still disagree on which id ends a turn or pads a batch."""
    out: dict[str, str] = {}
    for role, value in tok.special_tokens_map.items():
        for i, t in enumerate(value if isinstance(value, list) else [value]):
            out[f"{role}[{i}]" if isinstance(value, list) else role] = str(t)
    return out


def has_tokenizer(path: str | Path) -> bool:
    """``path`` holds tokenizer files (a teacher directory may ship weights only; the student's then serve)."""
    p = Path(path)
    return (p / "tokenizer.json").is_file() or (p / "tokenizer_config.json").is_file()


def meta_model(path: str | Path, cfg: ModelsConfig) -> nn.Module:
    """The model of ``path`` built from its ``config.json`` on the meta device: its config and module tree
    (depth, hidden size) at no memory or read cost, so the pair check runs before any weights are loaded."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.trust_remote_code)


def check_pair(cfg: ModelsConfig, rep: RepConfig, *, uses_hidden_states: bool) -> LayerPlan:
    """The pre-flight of :func:`check_compatibility` from the model directories alone (no weights read):
    tokenizers as the stages load them (student: ``models.tokenizer`` or the student directory; teacher: its own
    directory when it has tokenizer files), both models on the meta device. ``pipelines.precheck`` runs it
    before DVC deletes any output; ``oprd-ci init`` runs it to pick the method.

    Raises:
        CompatibilityError: the pair cannot be distilled as configured (the message names the fix).
        FileNotFoundError: a directory is missing or not a Hugging Face model directory.
    """
    _check_dir(Path(cfg.student.path), "student")
    _check_dir(Path(cfg.teacher.path), "teacher")
    student_tok = load_tokenizer(cfg.tokenizer or cfg.student.path, cfg)
    teacher_tok = load_tokenizer(cfg.teacher.path, cfg) if has_tokenizer(cfg.teacher.path) else student_tok
    return check_compatibility(
        meta_model(cfg.student.path, cfg), meta_model(cfg.teacher.path, cfg), student_tok, teacher_tok, rep,
        uses_hidden_states=uses_hidden_states,
    )  # fmt: skip


def check_compatibility(
    student: nn.Module,
    teacher: nn.Module,
    student_tok: PreTrainedTokenizerBase,
    teacher_tok: PreTrainedTokenizerBase,
    rep: RepConfig,
    *,
    uses_hidden_states: bool,
) -> LayerPlan:
    """Pre-flight: tokenizer identity (vocabulary, special tokens, chat template), embedding size, depth
    (proportional map) and hidden size.

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
    s_special, t_special = _special_tokens(student_tok), _special_tokens(teacher_tok)
    if s_special != t_special:
        diff = sorted(k for k in s_special.keys() | t_special.keys() if s_special.get(k) != t_special.get(k))
        shown = ", ".join(f"{k}: {s_special.get(k)!r} vs {t_special.get(k)!r}" for k in diff[:3])
        raise CompatibilityError(
            f"tokenizers share a vocabulary but not their special tokens (student vs teacher: {shown}): the "
            "teacher would read the student's end-of-turn and padding ids differently. Give both the same "
            "tokenizer files."
        )
    s_tpl, t_tpl = student_tok.chat_template, teacher_tok.chat_template
    if s_tpl and t_tpl and s_tpl != t_tpl:
        raise CompatibilityError(
            "chat templates differ: prompts are rendered with the student's template, so the teacher would score "
            "responses in a format it was not trained on. Give both the same chat template (tokenizer_config.json "
            "or chat_template.jinja)."
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
