"""``oprd-ci retire --apply-policy [NAME]``: apply the ``retirement:`` rules of each model's current policy."""

from __future__ import annotations

from oprd_ci.registry_cli import RegistryCall, _emit, console


def _render(plans: list[dict]) -> None:
    for p in plans:
        verb = "would retire" if p["dry_run"] else "retired"
        if p["policy_version"] is None:
            console.print(f"{p['model']}: no policy, nothing to retire")
            continue
        for v, why in sorted(p["retired"].items(), key=lambda kv: int(kv[0])):
            console.print(f"{verb} {p['model']} v{v}: {why}")
        for v, why in sorted(p["protected"].items(), key=lambda kv: int(kv[0])):
            console.print(f"kept {p['model']} v{v}: {why}")
        if not p["retired"] and not p["protected"]:
            console.print(f"{p['model']}: nothing to retire under policy v{p['policy_version']}")


def retire_by_policy(
    name: str | None, *, reason: str, dry_run: bool, url: str | None, token: str | None, as_json: bool
) -> None:
    """One ``retire-by-policy`` request per model (NAME, or every registered model), each in its own transaction."""
    with RegistryCall(url, token) as call:
        names = [name] if name else call("GET", "/v1/models")
        plans = [
            call("POST", f"/v1/models/{n}/retire-by-policy", body={"dry_run": dry_run, "reason": reason})
            for n in names
        ]
    _emit(plans, as_json, _render)
