"""``rollout.engine: vllm`` fails early with one line that says what to do: vLLM missing, an architecture it
cannot serve, a CPU head size without a kernel. Runs with or without vLLM installed."""

from __future__ import annotations

import importlib.util

import pytest
from tiny_pair import tiny_params
from transformers import Qwen2Config

from trainer import rollout_vllm
from trainer.config import ConfigError
from trainer.rollout_vllm import require_vllm
from trainer.train import Trainer, main

HAS_VLLM = importlib.util.find_spec("vllm") is not None


@pytest.fixture
def no_vllm(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        rollout_vllm.importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a)
    )


def test_missing_vllm_is_a_config_error_naming_the_setup_step(no_vllm):
    with pytest.raises(ConfigError, match=r"setup\.sh --vllm"):
        require_vllm()


def test_trainer_refuses_before_training(no_vllm, tiny_pair, tmp_path):
    params = tiny_params(tiny_pair, tmp_path, **{"rollout.engine": "vllm"})
    with pytest.raises(ConfigError, match="vLLM is not installed"):
        Trainer(params, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / "ckpt").exists()


def test_cli_exits_2_with_one_line(no_vllm, tiny_pair, tmp_path, capsys):
    args = ["--params", str(tmp_path / "none.yaml"), "--out", str(tmp_path / "out")]
    (tmp_path / "none.yaml").write_text("{}\n")
    for k, v in {"models.teacher.path": tiny_pair["teacher"], "models.student.path": tiny_pair["student"],
                 "models.embedded": False, "task.prompts_file": tiny_pair["prompts"],
                 "rollout.engine": "vllm"}.items():  # fmt: skip
        args += ["--set", f"{k}={v}"]
    assert main(args) == 2
    errors = [ln for ln in capsys.readouterr().err.splitlines() if "error" in ln.lower()]
    assert len(errors) == 1 and errors[0].startswith("error: rollout.engine: vllm but vLLM is not installed")


@pytest.mark.skipif(not HAS_VLLM, reason="needs vLLM (bash scripts/setup.sh --vllm)")
def test_unservable_models_are_config_errors():
    ok = dict(
        vocab_size=32, hidden_size=64, num_attention_heads=2, num_key_value_heads=1, num_hidden_layers=1
    )
    assert require_vllm(Qwen2Config(**ok, architectures=["Qwen2ForCausalLM"]))
    with pytest.raises(ConfigError, match="cannot serve this model"):
        require_vllm(Qwen2Config(**ok, architectures=["NoSuchModelForCausalLM"]))
    with pytest.raises(ConfigError, match="head size 16"):
        require_vllm(Qwen2Config(**{**ok, "hidden_size": 32}, architectures=["Qwen2ForCausalLM"]))
