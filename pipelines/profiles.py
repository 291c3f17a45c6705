"""Profiles: partial params trees (``profiles/<name>.yaml``) deep-merged into ``params.yaml``.

DVC reads ``params.yaml`` as it is (it cannot interpolate nested keys such as ``${a.${b}}``), so selecting
another pair or task changes several sections at once; a profile holds exactly those keys and
``oprd-ci params apply profiles/<name>.yaml`` merges them in:

* mappings merge key by key; every other value (scalars, and lists as a whole: ``evaluate.suites``) replaces
  the value at the same key;
* the merged tree is validated with ``trainer.config`` first; on any problem nothing is written;
* ``params.yaml`` keeps its comments, key order and layout (ruamel.yaml round trip), written atomically;
* the result is the list of changed keys; ``git checkout params.yaml`` goes back.
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainer.config import ConfigError, Params, params_from_tree

__all__ = ["Change", "ProfileError", "apply_profile", "deep_merge", "load_profile", "merge_profile"]

_MISSING: Any = object()


class ProfileError(ConfigError):
    """A profile cannot be applied (unreadable, not a mapping, or the merged params do not validate)."""


@dataclass(frozen=True)
class Change:
    """One leaf that the merge changed: ``key`` is dotted; ``old`` is ``None`` for a key params.yaml lacked."""

    key: str
    old: Any
    new: Any
    added: bool = False

    def __str__(self) -> str:
        return f"{self.key}: {'(new)' if self.added else _show(self.old)} -> {_show(self.new)}"


def _show(value: Any) -> str:
    import json

    return json.dumps(_plain(value), separators=(", ", ": "), default=str)


def _plain(value: Any) -> Any:
    """ruamel's commented containers and scalar subclasses as plain Python (for comparison and printing)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, bool) or value is None:
        return value
    for t in (int, float, str):
        if isinstance(value, t):
            return t(value)
    return value


def _yaml():  # type: ignore[no-untyped-def]
    from ruamel.yaml import YAML

    y = YAML(typ="rt")
    y.preserve_quotes = True
    y.width = 4096  # never re-wrap a long line (the prompt suffix, comments)
    y.indent(mapping=2, sequence=2, offset=0)  # params.yaml's layout: "- item" at its key's indentation
    # ``null`` stays ``null`` (ruamel's round trip would write an empty value, which reads the same but is
    # not how params.yaml spells it).
    y.representer.add_representer(
        type(None), lambda r, _: r.represent_scalar("tag:yaml.org,2002:null", "null")
    )
    return y


def load_profile(path: str | Path) -> dict[str, Any]:
    """The profile at ``path`` as a plain mapping; raises :class:`ProfileError` (one line) when it is not one."""
    import yaml

    p = Path(path)
    try:
        doc = yaml.safe_load(p.read_text())
    except OSError as exc:
        raise ProfileError(f"{p}: cannot read the profile ({exc.strerror or exc})") from None
    except yaml.YAMLError as exc:
        raise ProfileError(f"{p}: not valid YAML: {' '.join(str(exc).split())}") from None
    if not isinstance(doc, dict) or not doc:
        raise ProfileError(f"{p}: a profile is a non-empty mapping of params sections (e.g. models:, task:)")
    return doc


def deep_merge(base: Any, overlay: Mapping[str, Any], prefix: str = "") -> list[Change]:
    """Merge ``overlay`` into the mapping ``base`` in place; returns the changed leaves (dotted keys).

    Mappings merge recursively; any other value (lists included) replaces what ``base`` had at that key.
    """
    changes: list[Change] = []
    for key, new in overlay.items():
        dotted = f"{prefix}{key}"
        old = base.get(key, _MISSING)
        if isinstance(new, Mapping) and isinstance(old, Mapping):
            changes.extend(deep_merge(old, new, f"{dotted}."))
            continue
        if old is not _MISSING and _plain(old) == _plain(new):
            continue
        base[key] = new
        changes.append(Change(dotted, None if old is _MISSING else _plain(old), _plain(new), old is _MISSING))
    return changes


def merge_profile(
    params_path: str | Path, profile: Mapping[str, Any], source: str
) -> tuple[str, list[Change], Params]:
    """``params_path`` with ``profile`` merged in: ``(new file text, changes, validated Params)``.

    Raises:
        ProfileError: ``params_path`` is unreadable or the merged tree does not validate (nothing is written).
    """
    p = Path(params_path)
    y = _yaml()
    try:
        doc = y.load(p.read_text())
    except OSError as exc:
        raise ProfileError(f"{p}: cannot read ({exc.strerror or exc})") from None
    if doc is None:
        doc = y.load("{}\n")
    changes = deep_merge(doc, profile)
    try:
        params = params_from_tree(_plain(doc), f"{p} + {source}")
    except ConfigError as exc:
        raise ProfileError(str(exc)) from None
    buf = io.StringIO()
    y.dump(doc, buf)
    return buf.getvalue(), changes, params


def apply_profile(
    params_path: str | Path, profile_path: str | Path, *, dry_run: bool = False
) -> tuple[list[Change], Params]:
    """Deep-merge the profile file into ``params_path`` (validated first; atomic write; comments kept).

    Returns the changed leaves and the validated result. ``dry_run``: validate and report, write nothing.
    """
    text, changes, params = merge_profile(
        params_path, load_profile(profile_path), Path(profile_path).as_posix()
    )
    if changes and not dry_run:
        write_text_atomic(Path(params_path), text)
    return changes, params


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a sibling temporary file and rename it over ``path`` (never a half-written file)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
