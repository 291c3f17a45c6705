"""``oprd-ci init``: bring your own teacher/student pair (``pipelines.onboard``).

Checks the pair, the prompts and the suites, picks the method, writes ``profiles/<MODEL>.yaml`` and
``policies/<MODEL>.yaml``, installs the policy for MODEL in the registry (``PUT /v1/models/MODEL/policy``, the
call ``oprd-ci policy set`` makes; in-process on the local database unless ``--url`` / ``$OPRD_REGISTRY_URL``),
applies the profile to ``params.yaml`` and prints the next command. A bad input is one line on stderr, exit 2,
and nothing written; a failed registry call removes what init wrote.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from oprd_ci.registry_cli import EXIT_CONFLICT, EXIT_USAGE, RegistryCall, TokenOpt, UrlOpt, _fail, err


def init(
    teacher: Annotated[
        Path, typer.Option("--teacher", help="Teacher: a local Hugging Face model directory.")
    ],
    student: Annotated[
        Path, typer.Option("--student", help="Student base: a local Hugging Face model directory.")
    ],
    prompts: Annotated[
        Path, typer.Option("--prompts", help="Training prompts (json/jsonl/parquet, verl layout ok).")
    ],
    suite: Annotated[
        list[Path],
        typer.Option("--suite", help="Evaluation suite file (repeatable); its file name names it."),
    ],
    name: Annotated[
        str, typer.Option("--name", help="Your model's registry name (its own policy and champion).")
    ],
    method: Annotated[
        str | None,
        typer.Option(help="Override the method (default: oprd, or oprd_bridge when hidden sizes differ)."),
    ] = None,
    floor: Annotated[float, typer.Option(help="Lowest Avg@k floor of the starting policy.")] = 0.10,
    max_teacher_gap: Annotated[float, typer.Option(help="Teacher - candidate Avg@k allowed.")] = 0.30,
    smoke: Annotated[
        bool, typer.Option("--smoke", help="Micro budgets (minutes on CPU) and 8 problems per suite.")
    ] = False,
    trust_remote_code: Annotated[
        bool, typer.Option(help="Allow the models' own code (off by default).")
    ] = False,
    params: Annotated[Path, typer.Option("--params", help="The params.yaml to apply the profile to.")] = Path(
        "params.yaml"
    ),
    reason: Annotated[
        str | None, typer.Option("--reason", help="Audit reason for installing the policy.")
    ] = None,
    force: Annotated[
        bool,
        typer.Option(
            "--force", help="Overwrite an existing profile/policy file and install a changed policy."
        ),
    ] = False,
    url: UrlOpt = None,
    token: TokenOpt = None,
) -> None:
    """Bring your own pair: check it, write profiles/NAME.yaml and policies/NAME.yaml, install the policy for
    NAME, apply the profile to params.yaml, and print the next command (`dvc repro`)."""
    from pipelines.onboard import OnboardError, plan_onboarding
    from pipelines.profiles import ProfileError, merge_profile, write_text_atomic
    from server.policy import PolicySpec
    from server.policy_sync import PolicyMismatch, plan_policy

    root = params.resolve().parent
    try:
        ob = plan_onboarding(
            teacher=teacher, student=student, prompts=prompts, suites=suite, name=name, root=root,
            method=method, smoke=smoke, floor=floor, max_teacher_gap=max_teacher_gap,
            trust_remote_code=trust_remote_code,
        )  # fmt: skip
        if not force:
            for path in (ob.profile_path, ob.policy_path):
                if path.exists():
                    raise OnboardError(
                        f"{path.relative_to(root)} exists (init ran for {name} before); pass --force to rewrite it"
                    )
        new_params, changes, merged = merge_profile(params, ob.profile, f"profiles/{name}.yaml")
    except (OnboardError, ProfileError) as exc:
        _fail(EXIT_USAGE, " ".join(str(exc).split("\n")[:1]))
        return
    policy_rel = ob.policy_path.relative_to(root).as_posix()
    install_reason = (
        reason or f"starting policy for {name} from oprd-ci init ({', '.join(s.name for s in ob.suites)})"
    )
    old_params = params.read_text()
    written: list[Path] = []
    url = url or merged.gate.registry_url  # the registry the gate stage will use
    with RegistryCall(url, token) as call:
        current = call("GET", f"/v1/models/{name}/policy", missing_ok=True)
        installed = PolicySpec.model_validate(current["spec"]) if current else None
        try:
            plan = plan_policy(
                name, policy_rel, ob.policy_spec, installed, current and current["version"],
                install=force, reason=install_reason,
            )  # fmt: skip
        except PolicyMismatch:
            _fail(
                EXIT_CONFLICT,
                f"{name} already has policy v{current['version']} in the registry and it differs from the one init "
                f"derived; pick another --name, or pass --force (installs it as v{current['version'] + 1}, audited)",
            )
        try:
            for path, text in ((ob.profile_path, ob.profile_text), (ob.policy_path, ob.policy_text)):
                path.parent.mkdir(parents=True, exist_ok=True)
                write_text_atomic(path, text)
                written.append(path)
            if plan.action != "same":
                body = {"spec": ob.policy_spec.model_dump(mode="json"), "reason": plan.reason}
                installed_out = call("PUT", f"/v1/models/{name}/policy", body=body)
            else:
                installed_out = current
            write_text_atomic(params, new_params)
        except BaseException:
            for path in written:  # a failed registry call leaves the project as it was
                path.unlink(missing_ok=True)
            write_text_atomic(params, old_params)
            raise
    typer.echo(f"pair: {ob.method} ({ob.method_reason}); suites: "
               + ", ".join(f"{s.name} ({s.problems} problems)" for s in ob.suites))  # fmt: skip
    for note in ob.notes:
        err.print(f"[yellow]note:[/] {note}", highlight=False)
    typer.echo(f"wrote {ob.profile_path.relative_to(root)} and {policy_rel}")
    what = "already installed" if plan.action == "same" else "installed"
    typer.echo(f"policy: {name} v{installed_out['version']} {what} ({installed_out['digest']})")
    typer.echo(
        f"{params.name}: applied profiles/{name}.yaml ({len(changes)} keys changed; `git checkout {params.name}` goes back)"
    )
    typer.echo("next: dvc repro")
    typer.echo(f"then: oprd-ci status {name}")


def register(app: typer.Typer) -> None:
    """Add ``init`` to ``app``."""
    app.command("init")(init)
