"""How the DVC stages use the failure bank (pipelines/failures.py): one function per stage, called from the stage.

* distill: :func:`training_prompts` mixes the bank's training share into the rollout prompts at
  ``failures.train_ratio``; :func:`log_bank_input` records the bank as an MLflow dataset input of the run.
* evaluate: :func:`regression_suites` writes each regression suite as an ordinary suite file and
  :func:`find_champion` finds the model to score it against (the registry's champion); the candidate students
  and the champion are scored on them (:data:`REGRESSION_ROLES`).
* gate: :func:`failures_evidence` adds, per regression suite, the failures recorded against each version (the
  registry picks the champion's at decision time: "fixes N of M failures of v<champion>"); :func:`fixes_lines`
  states those numbers in the decision record.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from pipelines.failures import Bank, load_bank, normalize_prompt, write_regression_suite
from pipelines.suites import LoadedSuite, load_problems
from trainer.config import Params
from trainer.data import Prompt, load_prompts, mix_prompts
from trainer.export import file_sha256

__all__ = [
    "CHAMPION_RECORD",
    "REGRESSION_DIR",
    "REGRESSION_ROLES",
    "Champion",
    "ChampionMoved",
    "failures_evidence",
    "find_champion",
    "fixes_lines",
    "log_bank_input",
    "regression_suites",
    "score_champion",
    "training_prompts",
]

REGRESSION_DIR = Path("artifacts/eval/regression")
CHAMPION_RECORD = Path("artifacts/eval/champion.json")
REGRESSION_ROLES = ("student", "student_final")
"""Evaluate roles that are scored on the regression suites besides the champion (teacher and student base never
failed in production; scoring them would only cost time)."""
BANK_DATASET = "train_failures"
"""The bank's name as an MLflow dataset input of the distill run (and in the gate's ``dataset_digests``)."""


# ------------------------------------------------------------------------------------------------ distill
def training_prompts(params: Params, base_file: str | Path) -> tuple[list[Prompt], Bank | None]:
    """The distill stage's prompt pool: ``base_file``'s prompts plus the bank's training share at
    ``failures.train_ratio`` (:func:`trainer.data.mix_prompts`). Returns the pool and the bank when it was mixed
    in (``None``: nothing from the bank, the pool is exactly ``load_prompts(base_file)``)."""
    base = load_prompts(base_file)
    bank = load_bank(params.failures.bank)
    extra = bank.train_prompts()
    pool = mix_prompts(base, extra, params.failures.train_ratio)
    return pool, (bank if pool is not base else None)


def log_bank_input(run, bank: Bank) -> None:  # type: ignore[no-untyped-def]
    """Record the bank file as a training dataset input of ``run`` (a ``StageRun``) under its sha256; the frame
    is the training share (id, suite, grader, normalized prompt), which is what the run consumed."""
    from pipelines.tracking_models import log_dataset

    rows = bank.split("train")
    frame = pd.DataFrame(
        {"id": [r.id for r in rows], "suite": [r.suite for r in rows], "grader": [r.grader for r in rows],
         "prompt": [normalize_prompt(r.prompt) for r in rows]}
    )  # fmt: skip
    log_dataset(run.run_id, bank.path, BANK_DATASET, "training", bank.digest, df=frame,
                tags={"oprd.failures.train_rows": str(len(rows))}, client=run.client)  # fmt: skip


# ------------------------------------------------------------------------------------------------ evaluate
@dataclass(frozen=True)
class Champion:
    """The registry's current champion: its version number and the frozen model directory it was registered with."""

    version: int
    path: Path


class ChampionMoved(RuntimeError):
    """The champion changed between the evaluate and the gate stage; the regression evidence is stale."""


def find_champion(params: Params) -> Champion | None:
    """The current champion of ``gate.model_name`` (``oprd-ci status --json``: in-process on the local database,
    or ``gate.registry_url`` / ``$OPRD_REGISTRY_URL``). ``None`` when the model or its champion does not exist.

    Raises ``RuntimeError`` with the registry's message on any other failure (no silent "no champion")."""
    env = dict(os.environ)
    if params.gate.registry_url:
        env["OPRD_REGISTRY_URL"] = params.gate.registry_url
    proc = subprocess.run(
        [sys.executable, "-m", "oprd_ci", "status", params.gate.model_name, "--json"],
        env=env, capture_output=True, text=True, check=False,
    )  # fmt: skip
    if proc.returncode == 6:  # not found: no version registered yet
        return None
    try:  # exit 4 = MLflow disagrees with the registry; the registry (and its JSON) is authoritative
        status = json.loads(proc.stdout) if proc.returncode in (0, 4) else None
    except json.JSONDecodeError:
        status = None
    if status is None:
        raise RuntimeError(
            f"registry status of {params.gate.model_name!r} failed (exit {proc.returncode}): "
            f"{proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else 'no message'}"
        )
    champ = status.get("champion")
    return Champion(int(champ["version"]), Path(champ["artifact_path"])) if champ else None


def score_champion(params: Params, regression: list[LoadedSuite], record: Path = CHAMPION_RECORD) -> dict:
    """``{"champion": evaluate_model(...)}`` on the regression suites when there are some and a champion exists,
    else ``{}``. Writes ``record`` (``{"version", "path"}``, the version ``null`` without a champion) so the gate
    stage can check the champion did not move since."""
    from pipelines.evaluation import evaluate_model
    from pipelines.stage_io import write_json
    from pipelines.tracking import repo_relative

    champ = find_champion(params) if regression else None
    write_json(record, {"version": champ.version if champ else None,
                        "path": repo_relative(champ.path) if champ else None})  # fmt: skip
    if champ is None:
        return {}
    return {"champion": evaluate_model(champ.path, regression, params.evaluate, "champion")}


def regression_suites(params: Params, out_dir: Path = REGRESSION_DIR) -> list[LoadedSuite]:
    """Each bank suite with regression rows, written to ``out_dir/<suite>.jsonl`` and loaded like any suite (the
    embedded flag follows ``models.embedded``: the same prompt rendering as the task's own suite)."""
    bank = load_bank(params.failures.bank)
    suites = []
    for name in bank.suites():
        if not bank.split("regression", name):
            continue
        path = write_regression_suite(bank, name, out_dir / f"{name}.jsonl")
        suites.append(
            LoadedSuite(
                name=name,
                path=path,
                problems=load_problems(path),
                digest=file_sha256(path),
                embedded=params.models.embedded,
            )
        )
    return suites


# ------------------------------------------------------------------------------------------------ gate
def failures_evidence(params: Params) -> dict[str, dict[str, Any]]:
    """Per regression suite, ``{"recorded_failures": {version: [problem ids]}}`` for the gate's evidence.

    Raises :class:`ChampionMoved` when the champion the evaluate stage scored (``CHAMPION_RECORD``) is no longer
    the champion: the paired champion rows would be of another version."""
    if not CHAMPION_RECORD.is_file():
        return {}
    scored = json.loads(CHAMPION_RECORD.read_text()).get("version")
    if scored is not None:
        now = find_champion(params)
        if now is None or now.version != scored:
            raise ChampionMoved(
                f"the evaluate stage scored the regression suites against champion v{scored}, but the champion "
                f"is now {'v' + str(now.version) if now else 'none'}; re-run it: dvc repro -f evaluate"
            )
    bank = load_bank(params.failures.bank)
    return {
        name: {"recorded_failures": {str(v): ids for v, ids in bank.recorded_failures(name).items()}}
        for name in bank.suites()
        if bank.split("regression", name)
    }


def fixes_lines(criteria: list[dict[str, Any]]) -> list[str]:
    """The "fixes N of M failures of v<champion>" sentences of a decision's ``fixed_failures`` criteria."""
    return [
        f"- suite `{c.get('suite')}`: {c['detail']} ({c['status'].lower().replace('_', ' ')})"
        for c in criteria
        if c["criterion"] == "fixed_failures"
    ]
