"""The top-level CLI: params validation, results summary, and their exit codes."""

from pathlib import Path

from typer.testing import CliRunner

from oprd_ci.cli import app

REPO = Path(__file__).resolve().parents[2]
runner = CliRunner()


def test_params_validates_and_reports_bad_keys():
    ok = runner.invoke(app, ["params", "--params", str(REPO / "params.yaml")])
    assert ok.exit_code == 0 and "method: oprd" in ok.output
    bad = runner.invoke(app, ["params", "--params", str(REPO / "params.yaml"), "--set", "optim.lrr=1"])
    assert bad.exit_code == 2 and "did you mean 'lr'" in bad.output


def test_results_summarizes_the_committed_pipeline_metrics():
    out = runner.invoke(app, ["results", "--metrics-dir", str(REPO / "metrics")])
    assert out.exit_code == 0, out.output
    assert "student_base" in out.output and "gate: oprd-student" in out.output


def test_results_without_a_run_is_a_clear_error(tmp_path):
    out = runner.invoke(app, ["results", "--metrics-dir", str(tmp_path)])
    assert out.exit_code == 2 and "run `dvc repro` first" in out.output


def test_lineage_chain_has_short_hashes_and_mlflow_links():
    from oprd_ci.registry_cli import lineage_chain

    out = {
        "model": "stud",
        "version": {"version": 3, "manifest_sha256": "ab" * 32, "status": "READY"},
        "evidence": {"lineage": {"teacher": "teacher@" + "cd" * 32, "student_base": "ef" * 32,
                                 "dataset_digests": {"train_prompts": "12" * 32},
                                 "mlflow_run_ids": {"rollout": "o" * 32, "distill": "r" * 32}}},
        "mlflow": {"runs": {"distill": {"run_id": "r" * 32, "status": "FINISHED", "experiment_id": "7"}},
                   "logged_models": {"teacher": {"model_id": "m-t"}}},
    }  # fmt: skip
    rows = {what: (ident, url) for what, ident, url in lineage_chain(out, "http://ui:5123")}
    assert rows["stud v3"] == ("sha256 abababababab [READY]", "http://ui:5123/#/models/stud/versions/3")
    assert rows["teacher"] == ("teacher@cdcdcdcdcdcd", "http://ui:5123/#/experiments/7/models/m-t")
    assert rows["student base"] == ("sha256 efefefefefef", "")  # no LoggedModel id known: no guessed link
    assert rows["distill run"] == ("rrrrrrrr FINISHED", "http://ui:5123/#/experiments/7/runs/" + "r" * 32)
    # the training data is linked where the version page links it: the run that trained on it
    assert rows["training data"] == ("train_prompts 121212121212", rows["distill run"][1])
    assert rows["rollout run"][1] == "http://ui:5123/#/experiments/7/runs/" + "o" * 32


def _imports_torch(args: list[str], cwd: Path) -> tuple[int, bool]:
    """Run ``oprd-ci ARGS`` in a fresh interpreter; its exit code and whether ``torch`` got imported."""
    import subprocess
    import sys

    code = (
        "import runpy, sys\n"
        f"sys.argv = ['oprd-ci', *{args!r}]\n"
        "try:\n    runpy.run_module('oprd_ci', run_name='__main__')\n"
        "except SystemExit as e:\n    code = e.code or 0\nelse:\n    code = 0\n"
        "print('RESULT', code, 'torch' in sys.modules, file=sys.stderr)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True,
                         env={"PYTHONPATH": str(REPO), "PATH": str(Path(sys.executable).parent)}, timeout=120)  # fmt: skip
    _, rc, torch = out.stderr.strip().splitlines()[-1].split()
    return int(rc), torch == "True"


def test_daily_commands_do_not_import_torch(tmp_path):
    """Daily commands answer in well under 2 s: importing torch (and transformers) alone costs ~8 s on a loaded
    2-core box, so commands that need no model must not import it (a helper module's top-level import did, once)."""
    (tmp_path / "params.yaml").write_text("failures:\n  regression_fraction: 0.5\n")
    for args in (["--help"], ["failures", "show"], ["failures", "show", "--json"]):
        rc, torch = _imports_torch(args, tmp_path)
        assert rc == 0 and not torch, (args, rc, torch)
