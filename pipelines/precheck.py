"""DVC stage ``precheck``: validate everything a ``dvc repro`` will read BEFORE any stage deletes its outputs.

DVC removes a stage's outputs just before it runs the stage's command. A stage that then fails on a bad
``params.yaml`` value, an empty prompts file or a wrong model path has already destroyed the previous outputs
(and for ``bootstrap``, the committed teacher and student base). Every stage therefore depends on this stage's
output, and DVC runs this stage first: when it fails, no other stage has started and nothing is deleted.

    python -m pipelines.precheck --params params.yaml

Checks (all problems are collected and reported together, one line each, exit 2):

* ``params.yaml`` validates (typed config, unknown keys are errors);
* ``task.prompts_file`` holds at least one well-formed prompt (``trainer.data.load_prompts``), and the rows that
  carry a ``grader``/``reference`` pass that grader's checks (``pipelines.suites.check_prompt_references``);
* the teacher, student base and tokenizer directories exist and hold a Hugging Face config and weights;
* teacher and student fit ``distill.method`` (:func:`check_pair_for_method`: tokenizer identity, chat template,
  hidden sizes, depth and layer plan; the rollout stage's own pre-flight, run from config files only);
* every evaluation suite names a registered grader (did-you-mean on a typo), and its file loads with every row's
  grader known and every reference accepted by that grader's ``check_reference`` (``pipelines.suites.load_suite``);
* ``gate.policy`` is a valid policy and equals the one installed for ``gate.model_name``
  (:func:`check_policy_installed`);
* the MLflow tracking store answers (``pipelines.tracking.check_tracking_reachable``);
* with ``signing.sign`` on, the signing key exists (``$OPRD_SIGNING_KEY`` or ``~/.config/oprd-ci/keys/signing.pem``:
  :func:`check_signing_key`), so a missing key stops the run here rather than after distillation.

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
from trainer.signing import KEY_ENV, signing_key_path

__all__ = ["OK_FILE", "PrecheckFailed", "check_params", "check_signing_key", "main"]

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


def check_signing_key(params: Params) -> str | None:
    """The problem line for a missing signing key, or None (``signing.sign`` off, or the key file exists)."""
    if not params.signing.sign:
        return None
    path = signing_key_path()
    if path.is_file():
        return None
    return (
        f"signing: no private key at {path} (set ${KEY_ENV} to a PEM EC private key, or run "
        "`oprd-ci keys generate`, which `bash scripts/setup.sh` does; or set signing.sign: false)"
    )


def check_params(params: Params, *, check_tracking: bool = True) -> list[str]:
    """Every problem found in the inputs ``params`` names, as ``<key>: <what is wrong>`` lines (empty: fine)."""
    problems: list[str] = []
    m = params.models
    before = len(problems)
    _check_model_dir(params, "models.teacher.path", m.teacher.path, problems)
    _check_model_dir(params, "models.student.path", m.student.path, problems)
    if m.tokenizer is not None and not Path(m.tokenizer).is_dir():
        problems.append(f"models.tokenizer: {m.tokenizer!r} is not a directory")
    if len(problems) == before and Path(m.teacher.path).is_dir() and Path(m.student.path).is_dir():
        problems.extend(check_pair_for_method(params))

    prompts = Path(params.task.prompts_file)
    if prompts.exists() or not _generated_by_bootstrap(params, prompts):
        from pipelines.suites import check_prompt_references
        from trainer.data import load_prompts  # imports torch: only when there is a file to read

        try:
            n = len(load_prompts(prompts))
            check_prompt_references(prompts)
        except (OSError, ValueError) as exc:
            problems.append(f"task.prompts_file: {exc}")
        else:
            if n < params.rollout.num_prompts:
                # Not an error: rollout takes the first num_prompts; fewer is legal but worth knowing.
                print(
                    f"precheck: note: {prompts} holds {n} prompts (< rollout.num_prompts={params.rollout.num_prompts})",
                    file=sys.stderr,
                )

    for key, engine in (
        ("rollout.engine", params.rollout.engine),
        ("evaluate.engine", params.evaluate.engine),
    ):
        # the install only: the models' architectures are checked by the stages themselves
        if engine == "vllm":
            from trainer.config import ConfigError
            from trainer.rollout_vllm import require_vllm

            try:
                require_vllm(key=key)
            except ConfigError as exc:
                problems.append(str(exc))

    from pipelines.graders import UnknownGrader, get_grader
    from pipelines.suites import SuiteFormatError, load_suite

    for suite in params.evaluate.suites:
        try:
            get_grader(suite.grader)
        except UnknownGrader as exc:
            problems.append(f"evaluate.suites[{suite.name}].grader: {exc}")
            continue
        path = suite.path or params.evaluate.embedded_path
        if not Path(path).exists() and _generated_by_bootstrap(params, path):
            continue
        try:
            load_suite(suite, params.evaluate.embedded_path)
        except SuiteFormatError as exc:  # its message names the suite, the file, the row and the problem
            problems.append(f"evaluate.suites: {exc}")
        except (OSError, ValueError) as exc:
            problems.append(f"evaluate.suites[{suite.name}]: {exc}")

    from pipelines.failures import check_bank

    problems += [
        f"failures.bank: {p}"
        for p in check_bank(params.failures.bank, [s.name for s in params.evaluate.suites])
    ]

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
            else:
                problems.extend(check_policy_installed(params))

    if check_tracking:
        from pipelines.tracking import TrackingUnreachable, check_tracking_reachable, resolve_tracking_uri

        try:
            check_tracking_reachable(
                resolve_tracking_uri(params.tracking), timeout_s=params.tracking.timeout_s
            )
        except TrackingUnreachable as exc:
            problems.append(f"tracking.uri: {exc}")
    if key := check_signing_key(params):
        problems.append(key)
    return problems


def check_pair_for_method(params: Params) -> list[str]:
    """The pair pre-flight of the rollout stage (``trainer.models.check_pair``: tokenizer vocabulary, special
    tokens and chat template, embedding size, hidden size against ``distill.method``, depth and the layer plan of
    ``distill.rep.layers``) from config files and tokenizers alone, before any weights are read."""
    from trainer.methods import method_spec
    from trainer.models import CompatibilityError, check_pair

    try:
        check_pair(
            params.models, params.distill.rep,
            uses_hidden_states=method_spec(params.distill.method).hidden_states,
        )  # fmt: skip
    except (CompatibilityError, OSError, ValueError) as exc:
        return [f"models (distill.method={params.distill.method}): {exc}"]
    return []


def check_policy_installed(params: Params) -> list[str]:
    """``gate.policy`` against the policy installed for ``gate.model_name`` (``server.policy_sync``), where the
    registry is cheap to ask: over HTTP when ``gate.registry_url`` / ``$OPRD_REGISTRY_URL`` is set, else read-only
    from the local registry database (``$OPRD_DATABASE_URL``, default ``sqlite:///registry.db``; a missing file
    means nothing is installed). An unreachable server is left to the gate stage, which fails closed."""
    from server.policy import PolicySpec, load_policy_file
    from server.policy_sync import PolicyMismatch, plan_policy, read_installed_policy

    g = params.gate
    try:
        wanted = load_policy_file(g.policy)
    except ValueError as exc:
        return [f"gate.policy: {g.policy}: {' '.join(str(exc).split())}"]
    url = g.registry_url or os.environ.get("OPRD_REGISTRY_URL")
    try:
        if url:
            import httpx

            token = os.environ.get("OPRD_TOKEN")
            r = httpx.get(
                f"{url.rstrip('/')}/v1/models/{g.model_name}/policy",
                headers={"Authorization": f"Bearer {token}"} if token else {},
                timeout=params.tracking.timeout_s,
            )
            if r.status_code == 404:
                installed = None
            elif r.status_code == 200:
                body = r.json()
                installed = (body["version"], PolicySpec.model_validate(body["spec"]))
            else:
                print(
                    f"precheck: note: registry answered {r.status_code}; the gate checks the policy",
                    file=sys.stderr,
                )
                return []
        else:
            db_url = os.environ.get("OPRD_DATABASE_URL", "sqlite:///registry.db")
            installed = read_installed_policy(g.model_name, db_url)
    except Exception as exc:
        print(f"precheck: note: policy not compared with the registry ({exc})", file=sys.stderr)
        return []
    try:
        plan_policy(
            g.model_name, g.policy, wanted, installed and installed[1], installed and installed[0],
            install=g.install_policy, reason=g.policy_reason,
        )  # fmt: skip
    except PolicyMismatch as exc:
        return [str(exc)]
    return []


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
