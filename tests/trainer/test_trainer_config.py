"""The typed config tree: unknown keys and bad values are readable errors; params.yaml is valid."""

from pathlib import Path

import pytest

from trainer.config import ConfigError, Params, load_params

REPO = Path(__file__).resolve().parents[2]


def test_repo_params_yaml_is_valid_and_complete():
    params = load_params(REPO / "params.yaml")
    assert params == Params.model_validate(params.model_dump())  # round-trips
    assert params.distill.method == "oprd" and params.distill.rep.normalize is False  # the paper setting


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("distill.metod=oprd", "distill.metod: unknown key; did you mean 'method'?"),
        ("distill.method=kd", "distill.method: Input should be 'oprd', 'opd_sampled'"),
        ("optim.lr=-1", "optim.lr: Input should be greater than 0 (got -1)"),
        ("distill.rep.layers=[0, 2]", "greater than 0"),  # 0 is the embedding output
        ("evaluate.suites=[{nme: x}]", "allowed keys here: grader, limit, name, path, prompt_suffix"),
        (
            "evaluate.suites=[{name: x, promt_suffix: a}]",
            "promt_suffix: unknown key; did you mean 'prompt_suffix'?",
        ),
        (
            "evaluate.suites=[{name: x, grader: 'a b'}]",
            "evaluate.suites.0.grader: String should match pattern",
        ),
        ("distill.rep.layers=[2, 2]", "duplicates"),
        ("nonsense", "expected KEY=VALUE"),
        ("distill.opd.mu=2", "distill.opd.mu was merged into distill.rep.coef"),
        ("distill.log_every=5", "distill.log_every: unknown key"),  # was never read; removed
    ],
)
def test_bad_values_name_the_key_and_the_fix(override, message):
    if message is None:
        load_params(None, [override])
        return
    with pytest.raises(ConfigError) as info:
        load_params(None, [override])
    assert message in str(info.value)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_params(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("distill: [1, 2")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("3\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_params(scalar)


def test_overrides_parse_yaml_values():
    p = load_params(
        None, ["optim.betas=[0.9, 0.95]", "distill.rep.layers=[1, 3]", "gate.registry_url=http://x"]
    )
    assert (
        p.optim.betas == (0.9, 0.95) and p.distill.rep.layers == [1, 3] and p.gate.registry_url == "http://x"
    )


def test_a_suite_names_its_grader_and_prompt_suffix():
    """Grader names are validated against the registered graders at precheck (they live in pipelines)."""
    default = load_params(None).evaluate.suites[0]
    assert (default.grader, default.prompt_suffix) == ("math", None)
    suite = load_params(
        None, ['evaluate.suites=[{name: t, path: t.jsonl, grader: tool_call, prompt_suffix: ""}]']
    )
    assert (suite.evaluate.suites[0].grader, suite.evaluate.suites[0].prompt_suffix) == ("tool_call", "")
