"""The watcher behind ``oprd-ci watch``: events -> triggers -> one DVC experiment per cycle -> a gate decision.

One pass (:meth:`Watcher.run_once`):

1. **Observe** the sources of ``watch:`` (``trainer.config.WatchConfig``), each as a :class:`Candidate` with a
   stable de-duplication key:

   - ``teacher_version``: the newest version of the MLflow registered model ``watch.teacher_model``
     (``teacher-version:<name>/<version>``); the cycle runs with ``models.teacher.path`` = the version's local
     directory and ``models.teacher.revision`` = ``models:/<name>/<version>``.
   - ``teacher_manifest``: the sha256 of ``models.teacher.path``/manifest.json (``teacher-manifest:<sha>``).
   - ``failure_bank``: the bank grew by ``watch.failure_rows`` rows since the last failure-bank trigger
     (``failure-bank:<file sha256>``).
   - ``policy``: the model's policy version in the registry (``policy:v<N>``).

   The first observation of the manifest, bank and policy sources is the *baseline* (recorded, no cycle): they
   trigger on change. A teacher version triggers as soon as it is seen (it has not been distilled yet).
2. **Submit** each candidate to the registry (``POST /v1/models/<name>/triggers``): a known key is a no-op.
3. **Follow** the model's queued or running cycle: its experiment's state in ``dvc queue status`` becomes the
   trigger's (``running``; ``failed`` with the reason; a finished experiment whose gate linked no decision is
   ``failed`` too). The gate stage itself links its decision (status ``done``).
4. **Claim** (``POST .../triggers/claim``): with no cycle queued or running, the pending triggers become one
   cycle (the registry does this under the model lock: at most one cycle per model, whatever the number of
   watchers). It is queued as ``dvc exp run --queue -n <exp> -S ...`` with the trigger's overrides plus
   ``watch.trigger_id`` / ``watch.trigger_kind`` and absolute paths for everything a queued experiment (which
   runs in a temporary copy of the repository) must share with the workspace: the MLflow store, the gate's
   frozen-student store and the checkpoints. With ``watch.start_worker`` a ``dvc queue start -j 1`` worker runs
   it (the worker exits when the queue is empty).

The registry is reached through ``call(method, path, body=None, params=None)`` (``oprd_ci.watch_cli`` passes the
CLI's registry client: HTTP or the app in-process), so this module never imports the service.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from pipelines.grid import _hydra_value, queue_states, read_experiments
from pipelines.tracking import resolve_tracking_uri
from trainer.config import Params, load_params

RegistryCall = Callable[..., Any]
TEACHERS_DIR = Path(".dvc/tmp/watch/teachers")
"""Where a teacher version without a local source directory is downloaded (``<name>/v<version>``)."""
FOLLOWED_KEYS = ("models.teacher.path", "models.teacher.revision")
"""Overrides a later cycle keeps from the newest teacher-version cycle (a failure-bank cycle after a new teacher
distils from that teacher, not from the workspace's params.yaml)."""


@dataclass(frozen=True)
class Candidate:
    """One observation of a source, as submitted to the registry (``server.triggers.TriggerIn``)."""

    kind: str
    key: str
    overrides: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    detail: str = ""
    baseline: bool = False

    def body(self) -> dict[str, Any]:
        return {"kind": self.kind, "key": self.key, "overrides": self.overrides, "info": self.info,
                "detail": self.detail, "baseline": self.baseline}  # fmt: skip


@dataclass
class PassReport:
    """What one pass did (``oprd-ci watch`` prints it; ``--json`` dumps it)."""

    observed: list[str] = field(default_factory=list)
    """Keys seen this pass."""
    new: list[dict[str, Any]] = field(default_factory=list)
    """Triggers created this pass (``{"id", "kind", "key", "status"}``)."""
    updated: list[str] = field(default_factory=list)
    """State changes of the running cycle (``"t3 running"``, ``"t3 failed: ..."``)."""
    queued: dict[str, Any] | None = None
    """The cycle queued this pass: ``{"trigger_id", "kind", "exp_name", "overrides"}``."""
    worker_started: bool = False
    active: dict[str, Any] | None = None
    """The model's queued or running cycle after this pass."""
    errors: list[str] = field(default_factory=list)

    def line(self) -> str:
        parts = [f"{len(self.observed)} observed", f"{len(self.new)} new"]
        if self.updated:
            parts.append("; ".join(self.updated))
        if self.queued:
            parts.append(
                f"queued t{self.queued['trigger_id']} ({self.queued['kind']}) as {self.queued['exp_name']}"
            )
        if self.active and not self.queued:
            parts.append(f"cycle t{self.active['id']} {self.active['status']} ({self.active['exp_name']})")
        if self.errors:
            parts.append("errors: " + "; ".join(self.errors))
        return ", ".join(parts)


# ----------------------------------------------------------------------------------------------- sources
def _local_dir(source: str) -> Path | None:
    """The directory a model-version ``source`` names when it is a local path (``/abs`` or ``file://``)."""
    if source.startswith("file://"):
        return Path(unquote(urlparse(source).path))
    if source.startswith("/"):
        return Path(source)
    return None


def teacher_version_candidate(tracking_uri: str, name: str, repo: Path) -> Candidate | None:
    """The newest version of the registered model ``name`` (None when it has none). Its local directory is the
    version's source when that is a local directory, else a download of ``models:/<name>/<version>`` under
    ``repo/.dvc/tmp/watch/teachers``."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    try:
        versions = client.search_model_versions(f"name = '{name}'")
    except MlflowException as exc:
        if "RESOURCE_DOES_NOT_EXIST" in str(exc.error_code):
            return None
        raise
    if not versions:
        return None
    mv = max(versions, key=lambda v: int(v.version))
    local = _local_dir(mv.source or "")
    if local is None or not local.is_dir():
        local = (repo / TEACHERS_DIR / name / f"v{mv.version}").resolve()
        if not local.is_dir():
            import mlflow.artifacts

            tmp = local.with_name(local.name + ".tmp")
            tmp.mkdir(parents=True, exist_ok=True)
            mlflow.artifacts.download_artifacts(
                artifact_uri=f"models:/{name}/{mv.version}", dst_path=str(tmp), tracking_uri=tracking_uri
            )
            tmp.rename(local)
    revision = f"models:/{name}/{mv.version}"
    return Candidate(
        kind="teacher_version",
        key=f"teacher-version:{name}/{mv.version}",
        overrides={"models.teacher.path": str(local.resolve()), "models.teacher.revision": revision},
        info={"name": name, "version": int(mv.version), "source": mv.source, "sha256": _manifest_sha(local)},
        detail=f"new teacher version {revision}",
    )


def _manifest_sha(path: Path) -> str | None:
    manifest = path / "manifest.json"
    try:
        return json.loads(manifest.read_text())["sha256"] if manifest.is_file() else None
    except (ValueError, KeyError):
        return None


def teacher_manifest_candidate(params: Params, repo: Path) -> Candidate | None:
    path = Path(params.models.teacher.path)
    sha = _manifest_sha(path if path.is_absolute() else repo / path)
    if sha is None:
        return None
    return Candidate(
        kind="teacher_manifest", key=f"teacher-manifest:{sha}", info={"path": str(path), "sha256": sha},
        detail=f"teacher {path} manifest {sha[:12]}", baseline=True,
    )  # fmt: skip


def failure_bank_candidate(
    params: Params, repo: Path, last: dict[str, Any] | None, threshold: int
) -> Candidate | None:
    """The bank's state when it grew by ``threshold`` rows since ``last`` (the newest failure-bank trigger's
    ``info``), or as the baseline when there is none."""
    path = Path(params.failures.bank)
    path = path if path.is_absolute() else repo / path
    data = path.read_bytes() if path.is_file() else b""
    rows = sum(1 for line in data.decode("utf-8").splitlines() if line.strip())
    digest = hashlib.sha256(data).hexdigest()
    since = int(last.get("rows", 0)) if last is not None else None
    if since is not None and rows - since < threshold:
        return None
    grew = (
        f"failure bank grew {since} -> {rows} rows" if since is not None else f"failure bank at {rows} rows"
    )
    return Candidate(
        kind="failure_bank", key=f"failure-bank:{digest}", info={"rows": rows, "sha256": digest},
        detail=grew, baseline=since is None,
    )  # fmt: skip


def policy_candidate(policy: dict[str, Any] | None) -> Candidate | None:
    if policy is None:
        return None
    v = int(policy["version"])
    return Candidate(
        kind="policy", key=f"policy:v{v}", info={"version": v, "digest": policy.get("digest")},
        detail=f"policy v{v}: {policy.get('reason', '')}"[:2000], baseline=True,
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------- watcher
def absolute_db_url(url: str, repo: Path) -> str:
    """A relative ``sqlite:///file`` made absolute against ``repo`` (a queued experiment runs elsewhere)."""
    if url.startswith("sqlite:///") and not url.startswith("sqlite:////"):
        rel = url[len("sqlite:///") :]
        if rel and not rel.startswith(":memory:"):
            return f"sqlite:///{(repo / rel).resolve()}"
    return url


class Watcher:
    """One model's triggers in one DVC project (``repo``), through the registry ``call``.

    Args:
        repo: the DVC project (its ``params.yaml`` is read every pass).
        call: ``call(method, path, body=None, params=None, missing_ok=False)`` -> the answer's JSON.
        registry_url: the registry the queued experiment's gate talks to (``-S gate.registry_url``); None: the
            gate runs the registry in-process on ``$OPRD_DATABASE_URL``, made absolute for the worker.
        start_worker: override ``watch.start_worker``.
    """

    def __init__(
        self,
        repo: Path,
        call: RegistryCall,
        *,
        params_file: str = "params.yaml",
        registry_url: str | None = None,
        start_worker: bool | None = None,
        exp_prefix: str = "watch",
    ) -> None:
        self.repo = Path(repo).resolve()
        self.call, self.params_file, self.registry_url = call, params_file, registry_url
        self.start_worker_override, self.exp_prefix = start_worker, exp_prefix

    def params(self) -> Params:
        return load_params(self.repo / self.params_file)

    # ---- registry
    def _triggers(self, model: str) -> list[dict[str, Any]]:
        return self.call("GET", f"/v1/models/{model}/triggers", params={"limit": 1000}, missing_ok=True) or []

    def candidates(self, p: Params, triggers: list[dict[str, Any]]) -> list[Candidate]:
        w, model, out = p.watch, p.gate.model_name, []
        uri = resolve_tracking_uri(p.tracking, root=self.repo)
        if w.teacher_model:
            out.append(teacher_version_candidate(uri, w.teacher_model, self.repo))
        if w.teacher_manifest:
            out.append(teacher_manifest_candidate(p, self.repo))
        if w.failure_rows is not None:
            last = next((t["info"] for t in reversed(triggers) if t["kind"] == "failure_bank"), None)
            out.append(failure_bank_candidate(p, self.repo, last, w.failure_rows))
        if w.policy_changes:
            out.append(policy_candidate(self.call("GET", f"/v1/models/{model}/policy", missing_ok=True)))
        return [c for c in out if c is not None]

    # ---- one pass
    def observe(self, p: Params, report: PassReport) -> list[dict[str, Any]]:
        """Steps 1-2: submit every source's observation; returns the model's triggers afterwards."""
        model = p.gate.model_name
        for c in self.candidates(p, self._triggers(model)):
            report.observed.append(c.key)
            ans = self.call("POST", f"/v1/models/{model}/triggers", body=c.body())
            if ans["created"]:
                t = ans["trigger"]
                report.new.append({k: t[k] for k in ("id", "kind", "key", "status")})
        return self._triggers(model)

    def run_once(self) -> PassReport:
        report = PassReport()
        p = self.params()
        model = p.gate.model_name
        triggers = self.observe(p, report)
        active = next((t for t in triggers if t["status"] in ("queued", "running")), None)
        if active is not None:
            active = self._follow(model, active, report)
        if active is None:
            claimed = self.call(
                "POST", f"/v1/models/{model}/triggers/claim", body={"exp_prefix": self.exp_prefix}
            )
            if claimed["trigger"] is not None:
                active = self._queue(p, claimed["trigger"], triggers, report)
        report.active = (
            {k: active[k] for k in ("id", "kind", "status", "exp_name")}
            if active and active["status"] in ("queued", "running")
            else None
        )
        return report

    def _follow(self, model: str, t: dict[str, Any], report: PassReport) -> dict[str, Any] | None:
        """Bring the trigger of the model's active cycle up to date with its experiment; returns the trigger while
        it is still queued or running, else None (a decision was linked, or the cycle failed)."""
        name = t["exp_name"]
        state = queue_states(self.repo).get(name)
        if state == "running" and t["status"] == "queued":
            t = self._set(model, t, "running", None)
            report.updated.append(f"t{t['id']} running")
        if state in ("queued", "running"):
            return t
        if state == "failed":
            why = f"experiment {name} failed (`dvc queue logs {name}`)"
        else:
            exp = read_experiments(self.repo).get(name)
            if exp is None and state is None:
                why = f"experiment {name} is neither queued nor recorded (removed?)"
            elif (exp or {}).get("state") in ("failed",):
                why = f"experiment {name} failed (`dvc queue logs {name}`)"
            else:
                fresh = next((x for x in self._triggers(model) if x["id"] == t["id"]), t)
                if fresh["status"] not in ("queued", "running"):
                    return None  # the gate linked its decision (done) meanwhile
                why = f"experiment {name} finished without a gate decision linked to trigger {t['id']}"
        t = self._set(model, t, "failed", why)
        report.updated.append(f"t{t['id']} failed: {why}")
        return None

    def _set(self, model: str, t: dict[str, Any], status: str, error: str | None) -> dict[str, Any]:
        return self.call(
            "POST", f"/v1/models/{model}/triggers/{t['id']}/state", body={"status": status, "error": error}
        )

    def exp_overrides(self, p: Params, t: dict[str, Any], triggers: list[dict[str, Any]]) -> dict[str, Any]:
        """The experiment's ``-S`` settings: the newest teacher-version cycle's teacher (kept by later cycles),
        the trigger's own overrides, the trigger identity and the absolute shared paths."""
        followed: dict[str, Any] = {}
        for x in triggers:
            if (
                x["kind"] == "teacher_version"
                and x["status"] in ("done", "queued", "running")
                and x["id"] != t["id"]
            ):
                followed = {k: v for k, v in x["overrides"].items() if k in FOLLOWED_KEYS}
        sets: dict[str, Any] = {**followed, **t["overrides"]}
        sets["watch.trigger_id"] = int(t["id"])
        sets["watch.trigger_kind"] = t["kind"]
        sets["tracking.uri"] = resolve_tracking_uri(p.tracking, root=self.repo)
        for key, value in (("gate.store", p.gate.store), ("checkpoint.dir", p.checkpoint.dir)):
            if not Path(value).is_absolute():
                sets[key] = str(self.repo / value)
        if self.registry_url:
            sets["gate.registry_url"] = self.registry_url
        return sets

    def worker_env(self) -> dict[str, str]:
        """The environment of the queue worker (and so of every stage it runs, in a temporary copy of the
        repository): the registry database and artifact roots made absolute when the gate runs it in-process."""
        env = dict(os.environ)
        if not self.registry_url and not env.get("OPRD_REGISTRY_URL"):
            # relative to this process's directory, as the registry this process opens in-process
            env["OPRD_DATABASE_URL"] = absolute_db_url(
                env.get("OPRD_DATABASE_URL") or "sqlite:///registry.db", Path.cwd()
            )
            env.setdefault("OPRD_ARTIFACT_ROOTS", str(self.repo))
        return env

    def _queue(
        self, p: Params, t: dict[str, Any], triggers: list[dict[str, Any]], report: PassReport
    ) -> dict[str, Any] | None:
        sets = self.exp_overrides(p, t, triggers)
        cmd = ["dvc", "exp", "run", "--queue", "-n", t["exp_name"],
               *(a for k, v in sets.items() for a in ("-S", f"{k}={_hydra_value(v)}"))]  # fmt: skip
        out = subprocess.run(cmd, cwd=self.repo, capture_output=True, text=True, env=self.worker_env())
        if out.returncode != 0:
            why = f"dvc exp run --queue failed (exit {out.returncode}): {out.stderr.strip()[-1500:]}"
            report.updated.append(f"t{t['id']} failed: {why}")
            self._set(p.gate.model_name, t, "failed", why)
            return None
        report.queued = {
            "trigger_id": t["id"],
            "kind": t["kind"],
            "exp_name": t["exp_name"],
            "overrides": sets,
        }
        start = self.start_worker_override if self.start_worker_override is not None else p.watch.start_worker
        if start:
            report.worker_started = self.start_worker()
        return t

    def start_worker(self) -> bool:
        """``dvc queue start -j 1`` with :meth:`worker_env` (a worker already running keeps its own)."""
        rc = subprocess.call(
            ["dvc", "queue", "start", "-j", "1"], cwd=self.repo, env=self.worker_env(),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        return rc == 0

    def wait(self, exp_name: str, timeout_s: float, poll_s: float = 2.0) -> str | None:
        """Wait until ``exp_name`` is neither queued nor running (its final queue state, or None at timeout)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            state = queue_states(self.repo).get(exp_name)
            if state not in ("queued", "running"):
                return state
            time.sleep(poll_s)
        return None
