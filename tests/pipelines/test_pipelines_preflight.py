"""The rollout stage's alignment pre-flight: aligned pairs pass, unrelated hidden bases refuse vanilla OPRD."""

import pytest
import torch
from tiny_pair import save_model, tiny_config, tiny_params
from transformers import Qwen2ForCausalLM

from pipelines.preflight import AlignmentError, check_alignment, measure_alignment, sample_rollouts
from trainer.data import encode_prompts, load_prompts
from trainer.models import check_compatibility, load_model, load_tokenizer
from trainer.rollout import HFGenerateEngine


def _report(params):
    m = params.models
    tok = load_tokenizer(m.student.path)
    student = load_model(m.student, m, role="student", trainable=False)
    teacher = load_model(m.teacher, m, role="teacher", trainable=False)
    plan = check_compatibility(student, teacher, tok, tok, params.distill.rep, uses_hidden_states=True)
    prompts = encode_prompts(tok, load_prompts(params.task.prompts_file)[:8])
    batch = sample_rollouts(student, prompts, params, HFGenerateEngine(pad_token_id=0, eos_token_id=2))
    return measure_alignment(student, teacher, batch, plan)


def test_shared_lineage_pair_is_aligned(tiny_pair, tmp_path):
    params = tiny_params(tiny_pair, tmp_path)
    report = _report(params)
    assert report.mean_cosine > 0.8
    assert check_alignment(report, params) is None
    assert set(report.as_metrics()) >= {"alignment/cosine_mean", "alignment/norm_ratio/layer_1"}


def test_independent_init_refuses_vanilla_oprd_but_allows_opd(tiny_pair, tmp_path):
    torch.manual_seed(123)
    stranger = save_model(Qwen2ForCausalLM(tiny_config()), _tokenizer(tiny_pair), tmp_path / "stranger")
    params = tiny_params(tiny_pair, tmp_path, **{"models.student.path": str(stranger)})
    report = _report(params)
    assert abs(report.mean_cosine) < 0.3
    with pytest.raises(AlignmentError, match=r"opd_sampled.*normalize.*allow_unaligned"):
        check_alignment(report, params)
    opd = tiny_params(
        tiny_pair, tmp_path, **{"models.student.path": str(stranger), "distill.method": "opd_sampled"}
    )
    assert check_alignment(report, opd) is None
    forced = tiny_params(
        tiny_pair, tmp_path, **{"models.student.path": str(stranger), "rollout.allow_unaligned": True}
    )
    assert check_alignment(report, forced).startswith("warning:")


def _tokenizer(pair):
    return load_tokenizer(pair["student"])


def test_wide_teacher_reports_norms_only_and_leaves_the_bridge_to_its_stage(
    tiny_pair, wide_teacher, tmp_path
):
    params = tiny_params(tiny_pair, tmp_path, **{"models.teacher.path": str(wide_teacher)})
    m = params.models
    tok = load_tokenizer(m.student.path)
    student = load_model(m.student, m, role="student", trainable=False)
    teacher = load_model(m.teacher, m, role="teacher", trainable=False)
    plan = check_compatibility(student, teacher, tok, tok, params.distill.rep, uses_hidden_states=False)
    prompts = encode_prompts(tok, load_prompts(params.task.prompts_file)[:8])
    batch = sample_rollouts(student, prompts, params, HFGenerateEngine(pad_token_id=0, eos_token_id=2))
    report = measure_alignment(student, teacher, batch, plan)
    assert all(c != c for c in report.cosine)  # NaN: 32- and 48-dim states have no coordinate-wise cosine
    assert all(0 < r < float("inf") for r in report.norm_ratio)
    bridge = tiny_params(tiny_pair, tmp_path, **{"distill.method": "oprd_bridge"})
    assert check_alignment(report, bridge) is None


def test_cross_width_report_keeps_metrics_strict_json():
    """Across hidden sizes cosine and MSE are undefined: the metrics leave them out (no NaN in metrics/rollout.json)
    and keep the norm ratio."""
    import json
    import math

    from pipelines.preflight import AlignmentReport

    nan = float("nan")
    report = AlignmentReport([1, 2], [nan, nan], [0.25, 0.5], [nan, nan])
    metrics = report.as_metrics()
    assert metrics == {"alignment/norm_ratio/layer_1": 0.25, "alignment/norm_ratio/layer_2": 0.5}
    json.loads(json.dumps(metrics), parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    aligned = AlignmentReport([1], [0.5], [1.0], [0.1]).as_metrics()
    assert aligned["alignment/cosine_mean"] == 0.5 and all(math.isfinite(v) for v in aligned.values())
