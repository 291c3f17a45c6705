"""Bringing your own pair (``oprd-ci init``): check it, pick the method, write its profile and starting policy.

    oprd-ci init --teacher DIR --student DIR --prompts FILE --suite FILE [--suite FILE ...] --name MODEL

:func:`plan_onboarding` does every check and builds both files in memory; nothing is written until all inputs
passed (the CLI then writes ``profiles/<MODEL>.yaml`` and ``policies/<MODEL>.yaml``, installs the policy in the
registry and applies the profile to ``params.yaml`` with ``pipelines.profiles``):

* **the pair**: ``trainer.models.check_pair`` (the rollout stage's pre-flight from config files and tokenizers:
  same vocabulary, special tokens and chat template; hidden sizes against the method; depth and the layer plan);
* **the method**: ``oprd`` when the hidden sizes are equal, ``oprd_bridge`` (a fitted low-rank bridge) when they
  differ; ``--method`` overrides;
* **the data**: the prompts load (``trainer.data.load_prompts``) and every suite loads and grades
  (``pipelines.suites.load_suite``);
* **the policy** (:func:`derive_policy`): per suite, numbers derived from its size and stated in YAML comments.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from trainer.config import EvalSuite, ModelsConfig, ModelSource, Params
from trainer.methods import METHODS, method_spec

__all__ = [
    "DEFAULT_FLOOR",
    "DEFAULT_MAX_TEACHER_GAP",
    "SMOKE",
    "OnboardError",
    "Onboarding",
    "SuiteInfo",
    "derive_policy",
    "plan_onboarding",
    "policy_yaml",
]

DEFAULT_FLOOR = 0.10
"""Lowest floor init writes: with no champion the floor and the teacher gap are the only accuracy criteria, so a
floor of 0 would let a broken student (Avg@k 0) through its first gate."""
DEFAULT_MAX_TEACHER_GAP = 0.30
"""Teacher minus candidate Avg@k on the same problems: 30 points behind its teacher, a student took little from it."""
MIN_PROBLEMS_CAP = 100
NI_MARGIN_BOUNDS = (0.02, 0.10)

SMOKE: dict[str, Any] = {
    "rollout": {"max_new_tokens": 24, "num_prompts": 8},
    "distill": {"steps": 4, "prompts_per_step": 4, "n_responses": 2, "memory_every": 2},
    "optim": {"num_threads": 1},
    "checkpoint": {"every": 2},
    "evaluate": {"k": 2, "max_new_tokens": 24, "batch_size": 8},
}
"""``--smoke``: micro budgets that run the whole pipeline in minutes on CPU (every suite also gets ``limit: 8``);
the gate then judges a barely trained student on 8 problems: INCONCLUSIVE on sample size at best."""
SMOKE_SUITE_LIMIT = 8


class OnboardError(ValueError):
    """A bad input to ``oprd-ci init``; the message is one line naming the option and the fix."""


@dataclass(frozen=True)
class SuiteInfo:
    """One evaluation suite as init saw it: ``problems`` is the size of the whole file."""

    name: str
    path: str
    problems: int
    grader: str = "math"
    """The suite's grader: the one its rows name when they all name the same, else ``math`` (rows still win)."""


@dataclass
class Onboarding:
    """Everything ``oprd-ci init`` writes, built and checked in memory."""

    name: str
    method: str
    method_reason: str
    profile: dict[str, Any]
    profile_text: str
    policy_text: str
    policy_spec: Any  # server.policy.PolicySpec
    profile_path: Path
    policy_path: Path
    suites: list[SuiteInfo]
    notes: list[str] = field(default_factory=list)


def _rel(path: Path, root: Path) -> str:
    """``path`` relative to the project ``root`` when inside it (portable profiles), else absolute."""
    p = path.resolve()
    try:
        return p.relative_to(root).as_posix()
    except ValueError:
        return p.as_posix()


def _round_up(x: float, step: float = 0.01) -> float:
    return round(math.ceil(x / step - 1e-9) * step, 10)


def derive_policy(
    suites: list[SuiteInfo],
    *,
    floor: float = DEFAULT_FLOOR,
    max_teacher_gap: float = DEFAULT_MAX_TEACHER_GAP,
) -> dict[str, dict[str, float | int]]:
    """Per-suite rules of a starting policy (``server.policy.SuiteRule`` fields) from each suite's size ``n``:

    * ``min_problems = min(n, 100)``: the whole suite (capped), so a ``limit``-ed smoke run is INCONCLUSIVE;
    * ``non_inferiority_margin``: the worst-case standard error of a paired mean difference of per-problem Avg@k
      fractions, ``sqrt(0.5 / n)`` (each difference lies in [-1, 1] with variance at most 0.5), rounded up to
      0.01 and kept in [0.02, 0.10]: a smaller margin would make the test a coin toss even for an equal
      candidate, a larger one would accept real regressions;
    * ``floor = max(floor, ceil(3 / n))``: at least ``floor`` and more than three problems' worth, so a few lucky
      samples cannot pass a first gate;
    * ``max_teacher_gap``: as given (default 0.30).

    Raises:
        OnboardError: a threshold that would be vacuous (floor 0, teacher gap 1) or out of [0, 1].
    """
    if not 0.0 < floor <= 1.0:
        raise OnboardError(
            f"--floor {floor}: must be in (0, 1]; with no champion yet a floor of 0 lets a broken student pass"
        )
    if not 0.0 <= max_teacher_gap < 1.0:
        raise OnboardError(
            f"--max-teacher-gap {max_teacher_gap}: must be in [0, 1); a gap of 1 never fails, so it checks nothing"
        )
    lo, hi = NI_MARGIN_BOUNDS
    rules: dict[str, dict[str, float | int]] = {}
    for s in suites:
        n = s.problems
        rules[s.name] = {
            "floor": min(1.0, max(floor, _round_up(3.0 / n))),
            "non_inferiority_margin": min(hi, max(lo, _round_up(math.sqrt(0.5 / n)))),
            "max_teacher_gap": max_teacher_gap,
            "min_problems": min(n, MIN_PROBLEMS_CAP),
        }
    return rules


def policy_yaml(
    name: str, rules: dict[str, dict[str, float | int]], suites: list[SuiteInfo], floor: float = DEFAULT_FLOOR
) -> str:
    """The policy file's text: the rules with a comment explaining each number (``server.policy.PolicySpec``)."""
    by_name = {s.name: s for s in suites}
    lo, hi = NI_MARGIN_BOUNDS
    lines = [
        f"# Starting promotion policy for {name}, written by `oprd-ci init` (server/policy.py: PolicySpec).",
        "# Scores are per-problem Avg@k fractions in [0, 1]. Edit the numbers, then install the change:",
        f"#   oprd-ci policy set {name} --file policies/{name}.yaml --reason '<why>'",
        "# (or set gate.install_policy: true and gate.policy_reason; `precheck` refuses a file that differs from",
        "# the installed policy). After the first run, raise each floor towards the student base's score.",
        "suites:",
    ]
    for suite, r in rules.items():
        n = by_name[suite].problems
        raw_margin = math.sqrt(0.5 / n)
        lines += [
            f"  {suite}:  # {n} problems in {by_name[suite].path}",
            f"    floor: {r['floor']}  # the candidate must average >= this: max(--floor {floor}, 3/{n} rounded "
            "up), so a broken student fails its first gate and a few lucky samples do not pass it",
            f"    max_teacher_gap: {r['max_teacher_gap']}  # teacher - candidate; further behind means the "
            "distillation did not transfer",
            "    # min_gap_closed: 0.5  # (candidate - base) / (teacher - base); left off until the first run shows "
            "the teacher beating the base on this suite (no gap to close fails closed)",
            f"    non_inferiority_margin: {r['non_inferiority_margin']}  # vs the champion: sqrt(0.5/{n}) = "
            f"{raw_margin:.3f}, the worst-case s.e. of a paired mean difference, kept in [{lo}, {hi}]",
            f"    min_problems: {r['min_problems']}  # the whole suite (at most {MIN_PROBLEMS_CAP}): a `limit`-ed "
            "smoke run is INCONCLUSIVE",
        ]
    lines += [
        "length_tokens:",
        "  max_ratio_to_champion: 1.5  # a 50% longer mean answer than the champion's is a regression",
        "cost_usd:",
        "  max_ratio_to_champion: 1.5  # so is a 50% costlier distillation run",
        "bootstrap:",
        "  seed: 0",
        "  n_resamples: 2000",
        "  confidence: 0.95  # one-sided, for the non-inferiority bound",
        "auto_rollback: false  # opt in once the policy has settled (also needs OPRD_AUTO_ROLLBACK=true)",
    ]
    return "\n".join(lines) + "\n"


def _suite_name(path: Path) -> str:
    from pydantic import TypeAdapter, ValidationError

    from server.names import SuiteName

    try:
        return TypeAdapter(SuiteName).validate_python(path.stem)
    except ValidationError:
        raise OnboardError(
            f"--suite {path}: the file name {path.stem!r} is not a usable suite name (letters, digits, '.', '_', "
            "'-'; rename the file)"
        ) from None


def _check_name(name: str) -> None:
    from pydantic import TypeAdapter, ValidationError

    from server.names import Name

    try:
        TypeAdapter(Name).validate_python(name)
    except ValidationError:
        raise OnboardError(
            f"--name {name!r}: a registry model name is 1-128 letters, digits, '.', '_' or '-', starting with a "
            "letter or digit"
        ) from None
    if name == Params().gate.model_name:
        raise OnboardError(
            f"--name {name}: that is the embedded task's model; give your pair its own name (e.g. my-team-1.5b)"
        )


def _hidden_size(path: Path, trust_remote_code: bool) -> int:
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    return int(getattr(cfg, "hidden_size", 0) or getattr(cfg.get_text_config(), "hidden_size", 0))


def plan_onboarding(
    *,
    teacher: Path,
    student: Path,
    prompts: Path,
    suites: list[Path],
    name: str,
    root: Path,
    method: str | None = None,
    smoke: bool = False,
    floor: float = DEFAULT_FLOOR,
    max_teacher_gap: float = DEFAULT_MAX_TEACHER_GAP,
    trust_remote_code: bool = False,
) -> Onboarding:
    """Check every input and build the profile and the policy (nothing is written).

    ``root`` is the project root (the directory of ``params.yaml``): paths inside it are written repo-relative.

    Raises:
        OnboardError: one line naming the bad option and how to fix it.
    """
    from trainer.models import CompatibilityError, check_pair

    root = root.resolve()
    _check_name(name)
    if not suites:
        raise OnboardError("--suite: give at least one evaluation suite file (json/jsonl/parquet)")
    if method is not None and method not in METHODS:
        raise OnboardError(f"--method {method!r}: one of {', '.join(METHODS)}")
    for opt, d in (("--teacher", teacher), ("--student", student)):
        if not d.is_dir():
            raise OnboardError(f"{opt} {d}: not a directory (a local Hugging Face model directory)")
    base = Params()
    models = ModelsConfig(
        teacher=ModelSource(path=str(teacher)),
        student=ModelSource(path=str(student)),
        trust_remote_code=trust_remote_code,
        embedded=False,
    )
    try:
        h_t, h_s = _hidden_size(teacher, trust_remote_code), _hidden_size(student, trust_remote_code)
    except (OSError, ValueError) as exc:
        raise OnboardError(f"--teacher/--student: {' '.join(str(exc).split())}") from None
    if method is None:
        method = "oprd" if h_t == h_s else "oprd_bridge"
        why = (
            f"equal hidden sizes ({h_s}): OPRD compares hidden states directly"
            if h_t == h_s
            else f"hidden sizes differ (student {h_s}, teacher {h_t}): OPRD-Bridge fits a low-rank bridge"
        )
    else:
        why = "--method"
    try:
        plan = check_pair(models, base.distill.rep, uses_hidden_states=method_spec(method).hidden_states)
    except (CompatibilityError, OSError, ValueError) as exc:
        raise OnboardError(f"pair: {' '.join(str(exc).split())}") from None

    from trainer.data import load_prompts

    try:
        n_prompts = len(load_prompts(prompts))
    except (OSError, ValueError) as exc:
        raise OnboardError(f"--prompts {prompts}: {' '.join(str(exc).split())}") from None

    from pipelines.suites import load_suite

    infos: list[SuiteInfo] = []
    for path in suites:
        suite_name = _suite_name(path)
        if any(s.name == suite_name for s in infos):
            raise OnboardError(
                f"--suite {path}: a second suite named {suite_name!r}; suite names come from file names"
            )
        try:
            loaded = load_suite(EvalSuite(name=suite_name, path=str(path)), base.evaluate.embedded_path)
        except (OSError, ValueError) as exc:
            raise OnboardError(f"--suite {path}: {' '.join(str(exc).split())}") from None
        graders = {p.grader for p in loaded.problems}
        grader = graders.pop() if len(graders) == 1 else "math"
        infos.append(SuiteInfo(suite_name, _rel(path, root), len(loaded.problems), grader))

    from server.policy import PolicySpec

    rules = derive_policy(infos, floor=floor, max_teacher_gap=max_teacher_gap)
    policy_text = policy_yaml(name, rules, infos, floor)
    spec = PolicySpec.model_validate(yaml.safe_load(policy_text))

    from transformers import AutoConfig

    max_pos = int(getattr(AutoConfig.from_pretrained(student, trust_remote_code=trust_remote_code),
                          "max_position_embeddings", 0) or 2048)  # fmt: skip
    new_tokens = max(16, min(4096, max_pos // 2))
    policy_path = root / "policies" / f"{name}.yaml"
    profile: dict[str, Any] = {
        "models": {
            "embedded": False,
            "teacher": {"path": _rel(teacher, root), "revision": None},
            "student": {"path": _rel(student, root), "revision": None},
            "tokenizer": None,
            "trust_remote_code": trust_remote_code,
        },
        "task": {"prompts_file": _rel(prompts, root)},
        "rollout": {"max_new_tokens": new_tokens},
        "distill": {"method": method},
        "evaluate": {
            "max_new_tokens": new_tokens,
            "suites": [
                {"name": s.name, "path": s.path, "limit": SMOKE_SUITE_LIMIT if smoke else None, **_grader(s)}
                for s in infos
            ],
        },
        "gate": {"model_name": name, "policy": _rel(policy_path, root), "install_policy": False,
                 "policy_reason": None},
    }  # fmt: skip
    if smoke:
        for section, values in SMOKE.items():
            profile.setdefault(section, {}).update(values)
    notes = list(plan.notes)
    if n_prompts < base.rollout.num_prompts:
        notes.append(
            f"{prompts} holds {n_prompts} prompts (< rollout.num_prompts={base.rollout.num_prompts})"
        )
    if method_spec(method).hidden_states:
        notes.append(
            "the rollout stage also measures the pair's hidden-state alignment on the student's own samples "
            "(rollout.min_cosine); a student not of the teacher's lineage is refused there: use --method oprd_bridge"
        )
    header = (
        f"# Profile of {name}, written by `oprd-ci init` on {datetime.now(UTC):%Y-%m-%d}: a partial params tree.\n"
        f"# Apply it with `oprd-ci params apply profiles/{name}.yaml` (init already did); go back with\n"
        "# `git checkout params.yaml`. Method: "
        f"{method} ({why}).\n"
        + ("# --smoke: micro budgets and 8 problems per suite; for a real run: init again with --force, without --smoke.\n"
           if smoke else "")
        + f"# max_new_tokens: half of the student's max_position_embeddings ({max_pos}), at most 4096.\n"
    )  # fmt: skip
    profile_text = header + yaml.safe_dump(profile, sort_keys=False, width=4096)
    return Onboarding(
        name=name, method=method, method_reason=why, profile=profile, profile_text=profile_text,
        policy_text=policy_text, policy_spec=spec, profile_path=root / "profiles" / f"{name}.yaml",
        policy_path=policy_path, suites=infos, notes=notes,
    )  # fmt: skip


def _grader(suite: SuiteInfo) -> dict[str, str]:
    """The suite's ``grader`` (``evaluate.suites[].grader``; docs/tasks.md)."""
    return {"grader": suite.grader}
