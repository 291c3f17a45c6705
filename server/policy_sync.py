"""Keeping the policy file a pipeline names (``gate.policy``) and the policy installed for the model one policy.

The registry decides under the model's *installed* policy; the pipeline's params name a *file*. When the two
differ, a gate would be decided under one policy while the params (and MLflow's record of them) say another. So
before a gate (``oprd-ci gate --policy FILE``) and at ``precheck``:

* same parsed :class:`~server.policy.PolicySpec` -> proceed;
* no policy installed -> install the file (the model's first policy);
* different -> refuse with one line naming the command that installs it, unless the caller explicitly asked to
  install it (``gate.install_policy: true`` with ``gate.policy_reason``), which stores it as the next audited
  policy version with that reason.

Comparison is on the parsed spec (:func:`~server.policy.policy_digest`), never on bytes: comments and key order
do not count.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from server.policy import PolicySpec, policy_differences, stored_policy

__all__ = ["PolicyMismatch", "PolicyPlan", "plan_policy", "read_installed_policy"]

Action = Literal["same", "install_first", "install_change"]


class PolicyMismatch(ValueError):
    """The policy file differs from the installed policy and installing it was not asked for (one line)."""


@dataclass(frozen=True)
class PolicyPlan:
    """What to do before a gate: ``same`` (nothing), ``install_first`` or ``install_change`` (PUT the file)."""

    action: Action
    reason: str | None = None
    """The audit reason to store with the install (``None`` for ``same``)."""


def plan_policy(
    name: str,
    file: str | Path,
    wanted: PolicySpec,
    installed: PolicySpec | None,
    installed_version: int | None = None,
    *,
    install: bool = False,
    reason: str | None = None,
) -> PolicyPlan:
    """Decide how the gate of ``name`` proceeds with policy file ``file`` (parsed: ``wanted``).

    Raises:
        PolicyMismatch: ``installed`` differs from ``wanted`` and ``install`` is False (or has no ``reason``).
    """
    if installed is None:
        return PolicyPlan("install_first", reason or f"initial policy from {Path(file).as_posix()}")
    diffs = policy_differences(installed, wanted)
    if not diffs:
        return PolicyPlan("same")
    if install and reason:
        return PolicyPlan("install_change", reason)
    shown = "; ".join(diffs[:3]) + (f"; +{len(diffs) - 3} more" if len(diffs) > 3 else "")
    version = f" v{installed_version}" if installed_version is not None else ""
    raise PolicyMismatch(
        f"gate.policy {Path(file).as_posix()} differs from the policy installed for {name}{version} ({shown}); "
        f"install it with `oprd-ci policy set {name} --file {shlex.quote(Path(file).as_posix())} --reason "
        f"'<why>'` or set gate.install_policy: true and gate.policy_reason in params.yaml"
    )


def read_installed_policy(name: str, database_url: str) -> tuple[int, PolicySpec] | None:
    """``(version, spec)`` of ``name``'s current policy read directly from the registry database, or ``None``
    when the model (or its policy, or a SQLite database file) does not exist. Read-only: a missing SQLite file is
    not created and no migration runs, so ``precheck`` can call it before anything else happens."""
    from sqlalchemy import create_engine, select
    from sqlalchemy.exc import OperationalError
    from sqlalchemy.orm import Session

    from server.orm import Policy, RegisteredModel

    if database_url.startswith("sqlite"):
        path = database_url.split("///", 1)[-1]
        if path in ("", ":memory:") or not Path(path).is_file():
            return None
        database_url = f"sqlite:///file:{Path(path).resolve()}?mode=ro&uri=true"
    engine = create_engine(database_url)
    try:
        with Session(engine) as s:
            row = s.execute(
                select(Policy.version, Policy.spec)
                .join(RegisteredModel, RegisteredModel.id == Policy.model_id)
                .where(RegisteredModel.name == name)
                .order_by(Policy.version.desc())
                .limit(1)
            ).first()
    except OperationalError as exc:  # an empty or pre-migration database file: nothing installed yet
        if "no such table" in str(exc):
            return None
        raise
    finally:
        engine.dispose()
    # a row that fails today's bounds raises InvalidStoredPolicy naming the field (precheck prints it as a note)
    return None if row is None else (row[0], stored_policy(row[1], name, row[0]))
