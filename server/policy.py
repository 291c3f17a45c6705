"""Declarative, versioned promotion policies (the YAML in ``policies/`` and the ``policies`` table).

A policy only states thresholds; ``server.decision`` turns a policy plus evidence into a verdict. Every
threshold left ``None`` is not checked; every threshold that is set needs its metric in the evidence (a
missing metric fails closed).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import yaml
from pydantic import BaseModel, ConfigDict, Field

from server.names import SuiteName

Fraction = Annotated[float, Field(ge=0.0, le=1.0)]
Ratio = Annotated[float, Field(gt=0.0, le=1000.0)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class SuiteRule(_Strict):
    """Criteria on one eval suite. Scores are per-problem Avg@k fractions (n_correct / k) in [0, 1]."""

    floor: Fraction | None = None
    """Absolute floor on the candidate's mean Avg@k."""
    non_inferiority_margin: Fraction | None = None
    """Paired test vs the champion on the same problems: PASS when the lower bootstrap bound of the mean
    per-problem difference (candidate - champion) is above ``-margin``."""
    max_teacher_gap: Fraction | None = None
    """``teacher_mean - candidate_mean`` must not exceed this."""
    min_problems: int = Field(default=1, ge=1)
    """Fewer (paired) problems than this makes the statistical criteria INCONCLUSIVE."""
    min_fixed_fraction: Fraction | None = None
    """Failure-bank regression suites: of the M problems recorded as failures of the champion version (the
    evidence's ``recorded_failures``), the candidate must fix at least this share. No champion, or none of its
    failures on record in this suite: NOT_APPLICABLE."""
    fixed_min_avg_at_k: Annotated[float, Field(gt=0.0, le=1.0)] = 0.5
    """A recorded failure counts as fixed when the candidate's Avg@k on it (n_correct / k) is at least this."""


class Budget(_Strict):
    """An absolute cap and/or a cap relative to the champion's value of the same metric, and/or one relative to
    the median of the last ``recent_k`` promoted versions (catches a slow drift that stays under the per-step
    ratio; ``server.drift``)."""

    max: float | None = Field(default=None, ge=0.0)
    max_ratio_to_champion: Ratio | None = None
    max_ratio_to_recent_median: Ratio | None = None
    """candidate / median(value of the last ``recent_k`` promoted versions) must not exceed this; NOT_APPLICABLE
    while fewer than 2 promoted versions have the value on record."""
    recent_k: int = Field(default=5, ge=2, le=100)
    """How many of the most recently promoted versions (distinct, not retired) the median is taken over."""


_ADDED_DEFAULTS = {"max_ratio_to_recent_median": None, "recent_k": 5}
"""Budget keys added after policies were first stored: left out of the canonical form while at their default, so
the digest of a policy that does not use them is what it was before they existed."""


class Bootstrap(_Strict):
    seed: int = 0
    n_resamples: int = Field(default=2000, ge=100, le=10_000)
    """At most 10,000: with ``schemas.MAX_PROBLEMS`` problems that is 1e8 draws per criterion (about a second)."""
    confidence: Annotated[float, Field(gt=0.5, lt=1.0)] = 0.95
    """One-sided confidence of the non-inferiority bound."""


Fingerprint = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
"""sha256 hex of a public key's SubjectPublicKeyInfo PEM (``oprd-ci keys list``; model-signing's key hint)."""


class SigningRule(_Strict):
    """Signed distillation attestations (docs/signing.md). With ``required`` the registry refuses, at gate and
    at promote, an artifact that is unsigned, signed by a key it does not trust, changed after signing, or whose
    attestation disagrees with the evidence (teacher, student base, method, training data, eval suites)."""

    required: bool = False
    trusted_keys: list[Fingerprint] = Field(default_factory=list, max_length=64)
    """Fingerprints of the keys this model's artifacts may be signed by; each must be in the registry's keyring
    (``OPRD_TRUSTED_KEYS_DIR``, ``oprd-ci keys add``). Empty: every key in the keyring."""


class PolicySpec(_Strict):
    """A promotion policy. ``suites`` names every suite the evidence must contain."""

    suites: dict[SuiteName, SuiteRule] = Field(min_length=1)
    length_tokens: Budget = Budget()
    """Mean response length of the candidate in tokens (averaged over the policy's suites)."""
    cost_usd: Budget = Budget()
    device_hours: Budget = Budget()
    bootstrap: Bootstrap = Bootstrap()
    auto_rollback: bool = False
    """Roll the champion back when new evidence about it fails this policy (also needs OPRD_AUTO_ROLLBACK)."""
    signing: SigningRule = SigningRule()
    """Whether artifacts must carry a verified signature and distillation attestation, and by which keys."""


def load_policy_file(path: str | Path) -> PolicySpec:
    """Parse a policy YAML file; raises ``ValueError`` (pydantic ``ValidationError``) naming the bad key."""
    return PolicySpec.model_validate(yaml.safe_load(Path(path).read_text()))


def policy_digest(spec: PolicySpec) -> str:
    """``sha256:<hex>`` of the parsed policy in canonical JSON (sorted keys, defaults filled in): equal for two
    files that differ only in comments, key order, float spelling (``0.2`` / ``0.20``) or omitted defaults."""
    import hashlib
    import json

    data = spec.model_dump(mode="json")
    for key in ("length_tokens", "cost_usd", "device_hours"):
        for added, default in _ADDED_DEFAULTS.items():
            if data[key].get(added, default) == default:
                data[key].pop(added, None)
    if data.get("signing") == SigningRule().model_dump(mode="json"):
        data.pop("signing")  # added later too: a policy that does not use it keeps its digest
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()


def policy_differences(installed: PolicySpec, wanted: PolicySpec) -> list[str]:
    """``key: installed -> wanted`` for every setting that differs (dotted keys, parsed values; empty: same)."""

    def flat(d: object, prefix: str = "") -> dict[str, object]:
        if isinstance(d, dict):
            out: dict[str, object] = {}
            for k, v in d.items():
                out.update(flat(v, f"{prefix}{k}."))
            return out
        return {prefix[:-1]: d}

    a, b = flat(installed.model_dump(mode="json")), flat(wanted.model_dump(mode="json"))
    missing = object()
    return [
        f"{k}: {'(none)' if a.get(k, missing) is missing else a[k]} -> {'(none)' if b.get(k, missing) is missing else b[k]}"
        for k in sorted(a.keys() | b.keys())
        if a.get(k, missing) != b.get(k, missing)
    ]
