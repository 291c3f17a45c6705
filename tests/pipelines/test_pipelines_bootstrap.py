"""The bootstrap stage on a tiny configuration: real HF directories, verified manifests, determinism."""

import json
import random
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipelines.bootstrap import MAX_NEW_TOKENS, main, make_sft_batch, run_bootstrap
from pipelines.task import PROMPT_WIDTH, build_tokenizer, iter_problems, sample_problem
from trainer.config import ConfigError, load_params
from trainer.export import verify_manifest

torch.set_num_threads(1)

TINY = {
    "models.tiny.hidden_size": 32,
    "models.tiny.intermediate_size": 64,
    "models.tiny.num_hidden_layers": 2,
    "models.tiny.num_attention_heads": 2,
    "models.tiny.num_key_value_heads": 2,
    "task.num_train": 30,
    "task.num_val": 8,
    "task.num_eval": 12,
    "task.teacher_steps": 6,
    "task.student_base_step": 3,
    "task.eval_every": 3,
    "task.teacher_batch_size": 8,
    "task.teacher_warmup_steps": 2,
}


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    """The tiny bootstrap run twice into two directories."""
    params = load_params(None, TINY)
    a, b = tmp_path_factory.mktemp("a"), tmp_path_factory.mktemp("b")
    result = run_bootstrap(params, a, progress=False)
    run_bootstrap(params, b, progress=False)
    assert result is not None
    return a, b, json.loads((a / "bootstrap.json").read_text())


def test_bootstrap_writes_disjoint_task_splits(tiny_runs: tuple[Path, Path, dict]) -> None:
    """task/{train,val,eval}.jsonl have the configured sizes, the contract's keys and no shared prompt."""
    out, _, _ = tiny_runs
    rows = {
        s: [json.loads(x) for x in (out / "task" / f"{s}.jsonl").read_text().splitlines()]
        for s in ("train", "val", "eval")
    }
    assert {s: len(r) for s, r in rows.items()} == {"train": 30, "val": 8, "eval": 12}
    assert all(set(r) == {"id", "prompt", "answer"} for r in rows["val"] + rows["eval"])
    assert all(set(r) == {"id", "prompt", "answer", "response"} for r in rows["train"])
    prompts = [r["prompt"] for rs in rows.values() for r in rs]
    assert len(set(prompts)) == len(prompts)
    assert all(r["response"].endswith(f"\\boxed{{{r['answer']}}}") for r in rows["train"])


def test_bootstrap_models_load_as_hf_dirs_and_manifests_verify(tiny_runs: tuple[Path, Path, dict]) -> None:
    """Teacher and student base reload with Auto classes, carry eos/pad ids, verify their manifests and differ."""
    out, _, info = tiny_runs
    weights = {}
    for name in ("teacher", "student-base"):
        d = out / "models" / name
        assert (
            verify_manifest(d) == info["teacher" if name == "teacher" else "student_base"]["manifest_sha256"]
        )
        model = AutoModelForCausalLM.from_pretrained(d)
        tok = AutoTokenizer.from_pretrained(d)
        assert model.config.model_type == "qwen2" and model.config.vocab_size == len(tok) == 20
        assert model.generation_config.eos_token_id == tok.eos_token_id == 2
        assert model.generation_config.pad_token_id == tok.pad_token_id == 0
        text = "55+84=139 139-37=102 \\boxed{102}"  # stock loading keeps spaces and \boxed{ (one token)
        assert tok.decode(tok(text)["input_ids"], skip_special_tokens=True) == text
        assert tok.convert_ids_to_tokens(tok(text)["input_ids"])[-6:] == [" ", "\\boxed{", "1", "0", "2", "}"]
        assert (d / "model.safetensors").is_file()
        weights[name] = model.state_dict()["model.embed_tokens.weight"]
    assert not torch.equal(weights["teacher"], weights["student-base"])
    assert info["student_base"]["step"] == 3 and info["teacher"]["step"] in (3, 6)
    assert info["steps_run"] == 6 and set(info["val_curve"]) == {"3", "6"}
    assert 0.0 <= info["teacher"]["val_acc"] <= 1.0


def test_bootstrap_is_byte_identical_across_runs(tiny_runs: tuple[Path, Path, dict]) -> None:
    """Same params and seed -> identical manifests (weights, config, tokenizer) in both runs."""
    a, b, _ = tiny_runs
    for name in ("teacher", "student-base"):
        ma = json.loads((a / "models" / name / "manifest.json").read_text())
        mb = json.loads((b / "models" / name / "manifest.json").read_text())
        assert ma == mb
    for split in ("train", "val", "eval"):
        assert (a / "task" / f"{split}.jsonl").read_bytes() == (b / "task" / f"{split}.jsonl").read_bytes()


def test_make_sft_batch_masks_prompt_and_positions_from_first_real_token() -> None:
    """Labels cover exactly response+EOS; <pad> is masked; positions start at 0 on the first <s>."""
    tok = build_tokenizer()
    problems = [p for p, _ in zip(iter_problems(3), range(16), strict=False)]
    batch = make_sft_batch(problems, tok, random.Random(0))
    ids, mask, pos, labels = (
        batch["input_ids"],
        batch["attention_mask"],
        batch["position_ids"],
        batch["labels"],
    )
    # Trimmed: the widest prompt starts in column 0 and the longest response ends in the last column.
    assert mask[:, 0].any() and mask[:, -1].any() and ids.shape[1] <= PROMPT_WIDTH + 39
    for i, p in enumerate(problems):
        real = mask[i].nonzero().squeeze(-1)
        assert pos[i, real[0]] == 0 and ids[i, real[0]] == tok.bos_token_id
        assert (pos[i, real] == torch.arange(len(real))).all()
        target = labels[i][labels[i] != -100].tolist()
        assert target == tok(p.response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert (ids[i, mask[i] == 0] == tok.pad_token_id).all()
        assert tok.decode(ids[i, real], skip_special_tokens=True) == p.prompt + p.response


def test_bootstrap_rejects_student_step_after_teacher_end(tmp_path: Path) -> None:
    """A student step beyond the teacher run is a config error before any work."""
    params = load_params(None, {**TINY, "task.student_base_step": 7})
    with pytest.raises(ConfigError, match="student_base_step"):
        run_bootstrap(params, tmp_path, progress=False)
    assert not any(tmp_path.iterdir())


def test_bootstrap_skips_when_not_embedded_and_sources_exist(
    tiny_runs: tuple[Path, Path, dict], tmp_path: Path
) -> None:
    """models.embedded=false with existing dirs and prompts file builds nothing and returns None."""
    out, _, _ = tiny_runs
    params = load_params(
        None,
        {
            "models.embedded": False,
            "models.teacher.path": str(out / "models" / "teacher"),
            "models.student.path": str(out / "models" / "student-base"),
            "task.prompts_file": str(out / "task" / "train.jsonl"),
        },
    )
    assert run_bootstrap(params, tmp_path / "out", progress=False) is None
    assert not (tmp_path / "out").exists()


def test_bootstrap_cli_reports_missing_external_sources(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The CLI exits 2 and names each missing key when models.embedded=false points nowhere."""
    params_file = tmp_path / "params.yaml"
    params_file.write_text(
        "models:\n  embedded: false\n  teacher: {path: /nonexistent/teacher}\n  student: {path: /nonexistent/student}\n"
        "task:\n  prompts_file: /nonexistent/prompts.jsonl\n"
    )
    assert main(["--params", str(params_file), "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "models.teacher.path" in err and "models.student.path" in err and "task.prompts_file" in err
    assert not (tmp_path / "out").exists()


def test_longest_response_fits_generation_budget() -> None:
    """Every gold response + EOS fits the 42-token generation budget (rollout/eval max_new_tokens default)."""
    tok = build_tokenizer()
    rng = random.Random(5)
    longest = max(
        len(tok(sample_problem(rng).response, add_special_tokens=False)["input_ids"]) for _ in range(5000)
    )
    assert longest + 1 <= MAX_NEW_TOKENS
    assert longest == 37
