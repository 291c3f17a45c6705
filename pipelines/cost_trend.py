"""The gate run's cost trend picture (``cost/trend.png``): accuracy, tokens per response and cost per version.

The numbers are the registry's ``history --cost`` rows (``server.cost_history.CostHistoryRow`` as JSON), read
through the CLI like the gate itself (``oprd-ci history NAME --cost --json``: in-process on the local database, or
the server at ``$OPRD_REGISTRY_URL``), so the picture shows exactly what ``oprd-ci history --cost`` prints. Only
versions with evidence are plotted; the version this gate run decided about is drawn ringed.

Imports neither MLflow nor matplotlib at import time (both lazily), like ``pipelines.lineage``.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ARTIFACT = "cost/trend.png"
PROMOTED = ("champion", "promoted")


def trend_series(rows: list[dict[str, Any]]) -> dict[str, list]:
    """Per version with evidence (oldest first): ``version``, ``status``, ``accuracy_pct`` (mean Avg@k over its
    suites, in %), ``tokens`` (tokens per response), ``usd``, ``usd_per_point`` and ``flagged`` (bool: a cost or
    length criterion failed). Missing numbers are NaN, so a plot leaves a gap instead of failing."""
    nan = float("nan")
    keep = [r for r in rows if r["accuracy"]]
    num = lambda v: nan if v is None else float(v)  # noqa: E731
    return {
        "version": [int(r["version"]) for r in keep],
        "status": [r["status"] for r in keep],
        "accuracy_pct": [100.0 * sum(r["accuracy"].values()) / len(r["accuracy"]) for r in keep],
        "tokens": [num(r["tokens_per_response"]) for r in keep],
        "usd": [num(r["usd"]) for r in keep],
        "usd_per_point": [num(r["usd_per_point"]) for r in keep],
        "flagged": [bool(r["flagged"]) for r in keep],
    }


def render_trend(path: Path, rows: list[dict[str, Any]], candidate: int | None, *, title: str = "") -> Path:
    """Draw the three series against the version number (promoted versions green, others grey, flagged ones
    red-edged, ``candidate`` ringed) as a PNG at ``path``; returns ``path``."""
    import matplotlib

    matplotlib.use("Agg")  # headless: stages run without a display
    import matplotlib.pyplot as plt

    s = trend_series(rows)
    panels = [
        ("accuracy_pct", "accuracy (mean Avg@k, %)"),
        ("tokens", "tokens / response"),
        ("usd", "distill cost (USD)"),
    ]
    fig, axes = plt.subplots(len(panels), 1, figsize=(7.5, 7.0), sharex=True)
    colors = ["tab:green" if st in PROMOTED else "tab:grey" for st in s["status"]]
    edges = ["tab:red" if f else c for f, c in zip(s["flagged"], colors, strict=True)]
    for ax, (key, label) in zip(axes, panels, strict=True):
        ys = s[key]
        ax.plot(s["version"], ys, color="0.6", linewidth=1, zorder=1)
        ax.scatter(s["version"], ys, c=colors, edgecolors=edges, linewidths=1.5, s=36, zorder=2)
        promoted = [(v, y) for v, y, st in zip(s["version"], ys, s["status"], strict=True) if st in PROMOTED]
        if promoted:
            ax.plot(
                *zip(*promoted, strict=True), color="tab:green", linewidth=1.5, zorder=1, label="promoted"
            )
        if candidate in s["version"]:
            y = ys[s["version"].index(candidate)]
            if not math.isnan(y):
                ax.scatter([candidate], [y], s=220, facecolors="none", edgecolors="tab:blue", linewidths=2,
                           zorder=3, label=f"v{candidate} (this gate)")  # fmt: skip
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].scatter([], [], c="tab:grey", s=36, label="not promoted")  # legend entries only
    axes[0].scatter(
        [], [], c="white", edgecolors="tab:red", linewidths=1.5, s=36, label="cost/length flagged"
    )
    axes[0].legend(loc="best", fontsize=8)
    axes[-1].set_xlabel("registry version")
    axes[-1].xaxis.get_major_locator().set_params(integer=True)
    fig.suptitle(title or "cost over time")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def registry_cost_history(model: str, alias: str, env: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """``oprd-ci history MODEL --cost --alias ALIAS --json`` with ``env`` (the gate's): the registry's rows.
    Raises ``RuntimeError`` with the CLI's message when it fails."""
    cmd = [sys.executable, "-m", "oprd_ci", "history", model, "--cost", "--alias", alias, "--json"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise RuntimeError(
            f"oprd-ci history --cost exited with {done.returncode}: {done.stderr.strip()[-500:]}"
        )
    return json.loads(done.stdout)


def log_cost_trend(
    client: Any, run_id: str, rows: list[dict[str, Any]], candidate: int | None, *, title: str = ""
) -> str:
    """Render the picture and log it to run ``run_id`` as ``cost/trend.png``; also logs the rows it was drawn from
    as ``cost/history.json``. Returns the PNG's artifact path."""
    with tempfile.TemporaryDirectory(prefix="oprd-cost-") as tmp:
        render_trend(Path(tmp) / "trend.png", rows, candidate, title=title)
        (Path(tmp) / "history.json").write_text(json.dumps(rows, indent=2, sort_keys=True))
        client.log_artifacts(run_id, tmp, "cost")
    return ARTIFACT
