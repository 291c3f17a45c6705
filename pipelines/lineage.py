"""Lineage keyed by artifacts: run-ref files written next to stage outputs, the one set of MLflow UI links every
lineage view uses (:func:`lineage_links`), and the lineage picture.

Stages are separate processes and DVC may skip any of them, so "the latest MLflow run of stage X" is the wrong
upstream. Instead each stage writes ``<stage>.mlflow.json`` next to its outputs (declare it as a DVC ``out``
of that stage, ``cache: false`` is fine): the run id plus the sha256 of what it produced. A downstream stage
reads that file; when DVC skips the upstream stage (or restores it from the run cache) the file still names
the run that produced those very bytes.

This module imports neither MLflow nor matplotlib at import time (the picture imports matplotlib lazily), so the
CLI and the gate stage share it cheaply.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "LINK_LABELS",
    "REF_SUFFIX",
    "LineageEdge",
    "LineageNode",
    "RunRef",
    "RunRefError",
    "lineage_links",
    "model_url",
    "read_run_ref",
    "render_lineage",
    "run_url",
    "short_digest",
    "verdict_kind",
    "version_url",
    "write_run_ref",
]

REF_SUFFIX = ".mlflow.json"
_REF_VERSION = 1


class RunRefError(ValueError):
    """A run-ref file is missing or malformed; the message names the file and the stage to rerun."""


@dataclass(frozen=True)
class RunRef:
    """What one stage execution recorded about itself for the stages downstream."""

    stage: str
    run_id: str
    outputs: dict[str, str] = field(default_factory=dict)
    """``{output name: sha256}`` of the stage's outputs (datasets, model manifests, metric files)."""
    models: dict[str, str] = field(default_factory=dict)
    """``{role: LoggedModel id}`` of models the stage logged (teacher, student_base, student)."""
    tracking_uri: str | None = None
    experiment_id: str | None = None


def _ref_path(path: str | Path, stage: str | None) -> Path:
    p = Path(path)
    if p.is_dir():
        if not stage:
            raise RunRefError(f"{p} is a directory: pass stage= so the file can be named <stage>{REF_SUFFIX}")
        return p / f"{stage}{REF_SUFFIX}"
    return p


def write_run_ref(
    path: str | Path,
    run_id: str,
    outputs: Mapping[str, str],
    *,
    stage: str | None = None,
    models: Mapping[str, str] | None = None,
    tracking_uri: str | None = None,
    experiment_id: str | None = None,
) -> Path:
    """Write the run ref atomically and return its path.

    ``path`` is the file, or an existing directory in which ``<stage>.mlflow.json`` is written. ``stage``
    defaults to the file name without ``.mlflow.json``. The JSON is sorted and newline-terminated, so
    identical refs are byte-identical (stable DVC hashes).
    """
    target = _ref_path(path, stage)
    if stage is None:
        if not target.name.endswith(REF_SUFFIX):
            raise RunRefError(f"{target}: name it <stage>{REF_SUFFIX} or pass stage=")
        stage = target.name[: -len(REF_SUFFIX)]
    doc = {
        "version": _REF_VERSION,
        "stage": stage,
        "run_id": run_id,
        "outputs": dict(outputs),
        "models": dict(models or {}),
        "tracking_uri": tracking_uri,
        "experiment_id": experiment_id,
    }
    target.parent.mkdir(parents=True, exist_ok=True)
    # A killed stage must never leave a half-written ref that a later stage would trust.
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as fh:
        fh.write(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, target)
    return target


def read_run_ref(path: str | Path, *, stage: str | None = None) -> RunRef:
    """Read a file written by :func:`write_run_ref` (``path`` may be the directory plus ``stage``).

    Raises:
        RunRefError: the file is missing (the upstream stage never ran with tracking) or malformed.
    """
    target = _ref_path(path, stage)
    try:
        doc = json.loads(target.read_text())
    except FileNotFoundError:
        raise RunRefError(
            f"{target}: no run ref; run the upstream stage first (dvc repro) so it records its MLflow run"
        ) from None
    except (OSError, ValueError) as exc:
        raise RunRefError(
            f"{target}: unreadable run ref ({exc}); rerun the upstream stage (dvc repro -f)"
        ) from None
    try:
        return RunRef(
            stage=str(doc["stage"]),
            run_id=str(doc["run_id"]),
            outputs={str(k): str(v) for k, v in doc.get("outputs", {}).items()},
            models={str(k): str(v) for k, v in doc.get("models", {}).items()},
            tracking_uri=doc.get("tracking_uri"),
            experiment_id=doc.get("experiment_id"),
        )
    except (KeyError, TypeError, AttributeError) as exc:
        raise RunRefError(f"{target}: malformed run ref (missing {exc}); rerun the upstream stage") from None


# ------------------------------------------------------------------------------------------ MLflow UI links
def _base(base: str) -> str:
    return base.rstrip("/") + "/" if base else ""


def run_url(base: str, experiment_id: str, run_id: str, tab: str = "") -> str:
    """The MLflow UI page of a run. ``base`` is the UI's address (``http://host:5000``) or ``""`` for a link
    relative to the UI itself (what the markdown descriptions that the UI renders need)."""
    return f"{_base(base)}#/experiments/{experiment_id}/runs/{run_id}{'/' + tab if tab else ''}"


def model_url(base: str, experiment_id: str, model_id: str) -> str:
    """The MLflow UI page of a LoggedModel (its metrics, source run and registered versions)."""
    return f"{_base(base)}#/experiments/{experiment_id}/models/{model_id}"


def version_url(base: str, name: str, version: int | str) -> str:
    """The MLflow UI page of a registered model version."""
    return f"{_base(base)}#/models/{name}/versions/{version}"


LINK_LABELS: dict[str, str] = {
    "version": "model version",
    "teacher": "teacher",
    "student_base": "student base",
    "student": "student",
    "training_data": "training data",
    "rollout": "rollout run",
    "distill": "distill run",
    "evaluate": "evaluate run",
    "gate": "gate run",
    "picture": "lineage picture",
}
"""Every lineage concept that has a page in the MLflow UI, in the order views list them, with its label."""


def lineage_links(
    base: str,
    *,
    model_name: str,
    version: int | str,
    experiment_id: str | None,
    run_ids: Mapping[str, str],
    model_ids: Mapping[str, str],
) -> dict[str, str]:
    """``{concept: MLflow UI link}`` for one registered version: the single place that decides where each
    concept of :data:`LINK_LABELS` points, so the version page (``base=""``: links relative to the UI that
    renders them) and ``oprd-ci lineage`` (``base`` = the configured UI) never disagree.

    Targets: the version page; the teacher, student base and student LoggedModel pages (``model_ids`` roles
    ``teacher``, ``student_base``, ``student``); the rollout, distill, evaluate and gate runs (``run_ids`` by
    stage); the training data is the distill run (the run that trained on it, where MLflow lists the
    ``train_prompts`` dataset input); the picture is ``lineage/lineage.png`` among the gate run's artifacts.
    A concept whose id is unknown (or with no ``experiment_id``) is left out rather than linked wrongly.
    """
    out = {"version": version_url(base, model_name, version)}
    if experiment_id:
        for role in ("teacher", "student_base", "student"):
            if model_ids.get(role):
                out[role] = model_url(base, experiment_id, model_ids[role])
        if run_ids.get("distill"):
            out["training_data"] = run_url(base, experiment_id, run_ids["distill"])
        for stage in ("rollout", "distill", "evaluate", "gate"):
            if run_ids.get(stage):
                out[stage] = run_url(base, experiment_id, run_ids[stage])
        if run_ids.get("gate"):
            out["picture"] = run_url(base, experiment_id, run_ids["gate"], "artifacts/lineage/lineage.png")
    return {k: out[k] for k in LINK_LABELS if k in out}


# ------------------------------------------------------------------------------------------ the picture
@dataclass(frozen=True)
class LineageNode:
    """One box: ``key`` identifies it for edges; ``details`` are ``label: value`` lines under the title."""

    key: str
    title: str
    kind: str = "model"
    """``model | dataset | run | evaluation | gate | promote | reject | inconclusive``: the box colour (a gate
    box is drawn as its verdict: PROMOTE green, REJECT red, INCONCLUSIVE amber)."""
    details: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class LineageEdge:
    src: str
    dst: str
    label: str = ""


_COLOURS = {
    "model": "#dbeafe",
    "dataset": "#fef9c3",
    "run": "#e5e7eb",
    "evaluation": "#ede9fe",
    "gate": "#e5e7eb",
    "promote": "#bbf7d0",
    "reject": "#fecaca",
    "inconclusive": "#fde68a",
}
_BORDERS = {"promote": "#15803d", "reject": "#b91c1c", "inconclusive": "#b45309"}


def verdict_kind(verdict: str) -> str:
    """The node kind (colour) of a gate verdict."""
    return {"PROMOTE": "promote", "REJECT": "reject"}.get(verdict, "inconclusive")


def short_digest(digest: str, n: int = 12) -> str:
    """``sha256:...`` prefixes stripped, first ``n`` hex chars (what humans compare in a picture)."""
    return digest.split(":", 1)[-1][:n]


def _columns(nodes: Sequence[LineageNode], edges: Sequence[LineageEdge]) -> dict[int, list[LineageNode]]:
    """Nodes by column: a node's column is its longest distance from a source node (teacher and student base
    left, gate right).

    Raises:
        ValueError: duplicate node keys, an edge naming an unknown node, or a cycle.
    """
    keys = {n.key for n in nodes}
    if len(keys) != len(nodes):
        raise ValueError("render_lineage: duplicate node keys")
    for e in edges:
        if e.src not in keys or e.dst not in keys:
            raise ValueError(f"render_lineage: edge {e.src} -> {e.dst} names an unknown node")
    depth = {k: 0 for k in keys}
    for _ in range(len(nodes)):
        changed = False
        for e in edges:
            if depth[e.dst] < depth[e.src] + 1:
                depth[e.dst] = depth[e.src] + 1
                changed = True
        if not changed:
            break
    else:
        if edges:
            raise ValueError("render_lineage: the edges form a cycle")
    columns: dict[int, list[LineageNode]] = {}
    for n in nodes:
        columns.setdefault(depth[n.key], []).append(n)
    return dict(sorted(columns.items()))


def render_lineage(
    path_png: str | Path, nodes: Sequence[LineageNode], edges: Sequence[LineageEdge], *, title: str = ""
) -> Path:
    """Draw the lineage graph as a PNG with matplotlib (no graphviz binary) and return its path.

    Layout: :func:`_columns`, stacked within a column. A picture, not a page of links: MLflow shows HTML
    artifacts in a sandboxed frame whose links cannot navigate, so the linked lineage view is the model-version
    page (links from :func:`lineage_links`) and ``oprd-ci lineage``.

    Raises:
        ValueError: an edge names an unknown node, or the edges form a cycle.
    """
    import matplotlib

    matplotlib.use("Agg")  # headless: stages run without a display
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyBboxPatch

    columns = _columns(nodes, edges)
    ncol = max(columns) + 1 if columns else 1
    nrow = max((len(c) for c in columns.values()), default=1)
    box_w, box_h, gap_x, gap_y = 3.2, 1.9, 1.3, 0.5
    width = ncol * box_w + (ncol - 1) * gap_x + 0.6
    height = nrow * box_h + (nrow - 1) * gap_y + (1.0 if title else 0.5)
    fig, ax = plt.subplots(figsize=(width, height), dpi=100)
    ax.set_xlim(0, width)
    ax.set_ylim(0, height)
    ax.axis("off")
    if title:
        ax.text(width / 2, height - 0.35, title, ha="center", va="center", fontsize=12, weight="bold")

    centre: dict[str, tuple[float, float]] = {}
    top = height - (0.8 if title else 0.25)
    for col, members in sorted(columns.items()):
        x = 0.3 + col * (box_w + gap_x)
        for row, n in enumerate(members):
            y = top - (row + 1) * box_h - row * gap_y
            ax.add_patch(
                FancyBboxPatch(
                    (x, y),
                    box_w,
                    box_h,
                    boxstyle="round,pad=0.02,rounding_size=0.12",
                    facecolor=_COLOURS.get(n.kind, "#f3f4f6"),
                    edgecolor=_BORDERS.get(n.kind, "#374151"),
                )
            )
            ax.text(x + 0.12, y + box_h - 0.22, n.title, fontsize=9.5, weight="bold", va="top")
            lines = [f"{k}: {v}" for k, v in n.details.items()]
            ax.text(
                x + 0.12, y + box_h - 0.55, "\n".join(lines[:7]), fontsize=7.5, va="top", family="monospace"
            )
            centre[n.key] = (x, y + box_h / 2)

    for e in edges:
        (sx, sy), (dx, dy) = centre[e.src], centre[e.dst]
        start, end = (sx + box_w, sy), (dx, dy)
        ax.annotate("", xy=end, xytext=start, arrowprops={"arrowstyle": "->", "color": "#111827", "lw": 1.2})
        if e.label:
            ax.text((start[0] + end[0]) / 2, (start[1] + end[1]) / 2 + 0.1, e.label, fontsize=7, ha="center")

    out = Path(path_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    plt.close(fig)
    return out
