"""DVC stage ``precheck``: validate everything a ``dvc repro`` will read BEFORE any stage deletes its outputs.

DVC removes a stage's outputs just before it runs the stage's command. A stage that then fails on a bad
``params.yaml`` value, an empty prompts file or a wrong model path has already destroyed the previous outputs
(and for ``bootstrap``, the committed teacher and student base). Every stage therefore depends on this stage's
output, and DVC runs this stage first: when it fails, no other stage has started and nothing is deleted.

    python -m pipelines.precheck --params params.yaml

Checks (all problems are collected and reported together, one line each, exit 2):

* ``params.yaml`` validates (typed config, unknown keys are errors);
* ``task.prompts_file`` holds at least one well-formed prompt (``trainer.data.load_prompts``);
* the teacher, student base and tokenizer directories exist and hold a Hugging Face config and weights;
* every evaluation suite file loads (``pipelines.suites.load_suite``); ``gate.policy`` is a YAML mapping;
* the MLflow tracking store answers (``pipelines.tracking.check_tracking_reachable``).

With ``models.embedded: true`` a file that the ``bootstrap`` stage generates is checked only when it exists
(bootstrap will write it otherwise). The stage is ``always_changed``; its output ``artifacts/precheck.ok`` has the
same content on every success, so a passing check never makes a downstream stage re-run.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from trainer.config import ConfigError, Params, load_params

__all__ = ["OK_FILE", "PrecheckFailed", "check_params", "main"]

OK_FILE = Path("artifacts/precheck.ok")
OK_TEXT = "precheck passed\n"
"""Constant on purpose: downstream stages depend on this file's hash, which must not change between runs."""
BOOTSTRAP_OUTS = (
    Path("artifacts/task"),
    Path("artifacts/models/teacher"),
    Path("artifacts/models/student-base"),
    Path("artifacts/toolcall/task"),  # bootstrap_toolcall (task.name: toolcall)
    Path("artifacts/toolcall/models/teacher"),
    Path("artifacts/toolcall/models/student-base"),
)


class PrecheckFailed(ValueError):
    """One or more inputs of the pipeline are unusable; the message lists each problem on its own line."""


def _generated_by_bootstrap(params: Params, path: str | Path) -> bool:
    if not params.models.embedded:
        return False
    p = Path(path)
    return any(p == out or out in p.parents for out in BOOTSTRAP_OUTS)


def _check_model_dir(params: Params, key: str, path: str, problems: list[str]) -> None:
    d = Path(path)
    if not d.exists() and _generated_by_bootstrap(params, d):
        return
    if not d.is_dir():
        problems.append(f"{key}: {path!r} is not a directory")
    elif not (d / "config.json").is_file():
        problems.append(f"{key}: {path!r} is not a Hugging Face model directory (no config.json)")
    elif not any(d.glob("*.safetensors")):
        problems.append(f"{key}: {path!r} holds no *.safetensors weights")


def check_params(params: Params, *, check_tracking: bool = True) -> list[str]:
    """Every problem found in the inputs ``params`` names, as ``<key>: <what is wrong>`` lines (empty: fine)."""
    problems: list[str] = []
    m = params.models
    _check_model_dir(params, "models.teacher.path", m.teacher.path, problems)
    _check_model_dir(params, "models.student.path", m.student.path, problems)
    if m.tokenizer is not None and not Path(m.tokenizer).is_dir():
        problems.append(f"models.tokenizer: {m.tokenizer!r} is not a directory")

    prompts = Path(params.task.prompts_file)
    if prompts.exists() or not _generated_by_bootstrap(params, prompts):
        from trainer.data import load_prompts  # imports torch: only when there is a file to read

        try:
            n = len(load_prompts(prompts))
        except (OSError, ValueError) as exc:
            problems.append(f"task.prompts_file: {exc}")
        else:
            if n < params.rollout.num_prompts:
                # Not an error: rollout takes the first num_prompts; fewer is legal but worth knowing.
                print(
                    f"precheck: note: {prompts} holds {n} prompts (< rollout.num_prompts={params.rollout.num_prompts})",
                    file=sys.stderr,
                )

    from pipelines.suites import load_suite

    for suite in params.evaluate.suites:
        path = suite.path or params.evaluate.embedded_path
        if not Path(path).exists() and _generated_by_bootstrap(params, path):
            continue
        try:
            load_suite(suite, params.evaluate.embedded_path)
        except (OSError, ValueError) as exc:
            problems.append(f"evaluate.suites[{suite.name}]: {exc}")

    policy = Path(params.gate.policy)
    if not policy.is_file():
        problems.append(f"gate.policy: {str(policy)!r} is not a file")
    else:
        import yaml

        try:
            doc = yaml.safe_load(policy.read_text())
        except yaml.YAMLError as exc:
            problems.append(f"gate.policy: {policy} is not valid YAML ({exc})")
        else:
            if not isinstance(doc, dict):
                problems.append(f"gate.policy: {policy} must be a YAML mapping")

    if check_tracking:
        from pipelines.tracking import TrackingUnreachable, check_tracking_reachable, resolve_tracking_uri

        try:
            check_tracking_reachable(
                resolve_tracking_uri(params.tracking), timeout_s=params.tracking.timeout_s
            )
        except TrackingUnreachable as exc:
            problems.append(f"tracking.uri: {exc}")
    return problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description="DVC stage: check params, model paths and data before any stage runs"
    )
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--no-tracking", action="store_true", help="skip the MLflow reachability check")
    args = ap.parse_args(argv)
    try:
        params = load_params(args.params, args.overrides)
    except ConfigError as exc:
        print(f"precheck failed (nothing was deleted): {exc}", file=sys.stderr)
        return 2
    problems = check_params(params, check_tracking=not args.no_tracking)
    if problems:
        print(
            "precheck failed (no stage ran, nothing was deleted); fix params.yaml or the files it names:\n  "
            + "\n  ".join(problems),
            file=sys.stderr,
        )
        return 2
    OK_FILE.parent.mkdir(parents=True, exist_ok=True)
    tmp = OK_FILE.with_name(f".{OK_FILE.name}.{os.getpid()}")
    tmp.write_text(OK_TEXT)
    os.replace(tmp, OK_FILE)
    print("precheck: params, models, prompts, eval suites, policy and tracking store are usable")
    return 0


if __name__ == "__main__":
    sys.exit(main())
