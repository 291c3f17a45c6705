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
