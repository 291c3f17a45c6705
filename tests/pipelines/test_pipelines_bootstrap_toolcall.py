"""The bootstrap_toolcall stage at a micro budget: real HF directories, verified manifests, determinism."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipelines.bootstrap_toolcall import main, make_sft_batch, run_bootstrap_toolcall
from pipelines.stage_io import val_file
from pipelines.task_toolcall import MAX_NEW_TOKENS, build_tokenizer, check_response, make_splits
from server.policy import PolicySpec
from trainer.config import ConfigError, EvalSuite, load_params
from trainer.export import verify_manifest

torch.set_num_threads(1)

MICRO = {
    "models.tiny_toolcall.hidden_size": 32,
    "models.tiny_toolcall.intermediate_size": 64,
    "models.tiny_toolcall.num_hidden_layers": 2,
    "models.tiny_toolcall.num_attention_heads": 2,
    "models.tiny_toolcall.num_key_value_heads": 2,
    "task.toolcall.num_train": 30,
    "task.toolcall.num_val": 8,
    "task.toolcall.num_eval": 12,
    "task.toolcall.teacher_steps": 6,
    "task.toolcall.student_base_step": 3,
    "task.toolcall.eval_every": 3,
    "task.toolcall.teacher_batch_size": 8,
    "task.toolcall.teacher_warmup_steps": 2,
}


@pytest.fixture(scope="module")
def micro_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    """The micro bootstrap run twice into two directories."""
    params = load_params(None, MICRO)
    a, b = tmp_path_factory.mktemp("a"), tmp_path_factory.mktemp("b")
    assert run_bootstrap_toolcall(params, a, progress=False) is not None
    run_bootstrap_toolcall(params, b, progress=False)
    return a, b, json.loads((a / "bootstrap.json").read_text())


def test_writes_disjoint_splits_with_grader_and_reference(micro_runs: tuple[Path, Path, dict]) -> None:
    """task/{train,val,eval}.jsonl: configured sizes, the suite-row keys (grader tool_call, BFCL reference), gold
    responses on train rows that satisfy their reference, no prompt shared between splits."""
    out, _, _ = micro_runs
    rows = {
        s: [json.loads(x) for x in (out / "task" / f"{s}.jsonl").read_text().splitlines()]
        for s in ("train", "val", "eval")
    }
    assert {s: len(r) for s, r in rows.items()} == {"train": 30, "val": 8, "eval": 12}
    assert all(set(r) == {"id", "prompt", "grader", "reference"} for r in rows["val"] + rows["eval"])
    assert all(set(r) == {"id", "prompt", "response", "grader", "reference"} for r in rows["train"])
    assert {r["grader"] for rs in rows.values() for r in rs} == {"tool_call"}
    assert all(check_response(r["response"], r["reference"])[0] for r in rows["train"])
    prompts = [r["prompt"] for rs in rows.values() for r in rs]
    assert len(set(prompts)) == len(prompts)


def test_models_load_as_stock_hf_dirs_and_manifests_verify(micro_runs: tuple[Path, Path, dict]) -> None:
    """Teacher and student base reload with Auto classes (tool-call vocabulary, 128 positions, this task's
    generation budget), verify their manifests, and differ; bootstrap.json names them by the --out path."""
    out, _, info = micro_runs
    assert info["task"] == "toolcall" and info["steps_run"] == 6 and set(info["val_curve"]) == {"3", "6"}
    weights = {}
    for name, key in (("teacher", "teacher"), ("student-base", "student_base")):
        d = out / "models" / name
        assert verify_manifest(d) == info[key]["manifest_sha256"] and info[key]["dir"] == str(d)
        model = AutoModelForCausalLM.from_pretrained(d)
        tok = AutoTokenizer.from_pretrained(d)
        assert model.config.vocab_size == len(tok) == len(build_tokenizer())
        assert model.config.max_position_embeddings == 128 and model.config.hidden_size == 32
        assert model.generation_config.max_new_tokens == MAX_NEW_TOKENS
        assert model.generation_config.eos_token_id == tok.eos_token_id
        text = '[get_weather(city="new york"), set_timer(minutes=90, label="tea")]'
        assert tok.decode(tok(text)["input_ids"], skip_special_tokens=True) == text
        weights[name] = model.state_dict()["model.embed_tokens.weight"]
    assert info["student_base"]["step"] == 3
    assert not torch.equal(weights["teacher"], weights["student-base"])


def test_bootstrap_is_byte_identical_across_runs(micro_runs: tuple[Path, Path, dict]) -> None:
    """Same params and seed (one thread) -> every file of both model directories and splits byte-identical."""
    a, b, _ = micro_runs
    for sub in ("task", "models/teacher", "models/student-base"):
        files = sorted(p.relative_to(a) for p in (a / sub).rglob("*") if p.is_file())
        assert files
        for f in files:
            assert (a / f).read_bytes() == (b / f).read_bytes(), f


def test_sft_batch_trains_on_response_and_eos_only_in_the_rollout_layout() -> None:
    """Left-padded masked prompt, right-padded response: labels are exactly response + EOS, positions start at
    0 on <s> (what the rollout engine feeds the models)."""
    tok = build_tokenizer()
    problems = make_splits(1, 16, 1, 1).train
    batch = make_sft_batch(problems, tok)
    ids, mask, pos, labels = (batch[k] for k in ("input_ids", "attention_mask", "position_ids", "labels"))
    for i, p in enumerate(problems):
        real = mask[i].nonzero().squeeze(-1)
        assert ids[i, real[0]] == tok.bos_token_id and pos[i, real[0]] == 0
        assert (pos[i, real] == torch.arange(len(real))).all()
        target = labels[i][labels[i] != -100].tolist()
        assert target == tok(p.response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert (ids[i, mask[i] == 0] == tok.pad_token_id).all()


def test_rejects_student_step_after_teacher_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A student step beyond the teacher run: ConfigError before any work; the CLI says so in one line, exit 2."""
    params = load_params(None, {**MICRO, "task.toolcall.student_base_step": 7})
    with pytest.raises(ConfigError, match=r"task\.toolcall\.student_base_step"):
        run_bootstrap_toolcall(params, tmp_path, progress=False)
    assert not any(tmp_path.iterdir())
    assert main(["--out", str(tmp_path), "-S", "task.toolcall.student_base_step=99999"]) == 2
    assert "student_base_step" in capsys.readouterr().err


def test_val_file_follows_task_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The distill stage validates on the val split of the task ``task.name`` selects."""
    monkeypatch.chdir(tmp_path)
    for d in ("artifacts/task", "artifacts/toolcall/task"):
        (tmp_path / d).mkdir(parents=True)
        (tmp_path / d / "val.jsonl").write_text("{}\n")
    assert val_file(load_params(None, {})) == Path("artifacts/task/val.jsonl")
    assert val_file(load_params(None, {"task.name": "toolcall"})) == Path("artifacts/toolcall/task/val.jsonl")
    with pytest.raises(ConfigError, match=r"task\.name"):
        load_params(None, {"task.name": "chess"})


REPO = Path(__file__).resolve().parents[2]


def _deep_merge(base: dict, overlay: dict) -> dict:
    """What `oprd-ci params apply` does: mappings merge key by key, anything else (lists included) replaces."""
    out = dict(base)
    for key, value in overlay.items():
        out[key] = (
            _deep_merge(out[key], value)
            if isinstance(value, dict) and isinstance(out.get(key), dict)
            else value
        )
    return out


def test_committed_pair_matches_the_profile_and_the_policy_rejects_the_base() -> None:
    """profiles/toolcall.yaml points at the committed tool-call pair and splits, names the policy's suite, and
    leaves every key a bootstrap stage depends on alone; the policy's floor and teacher gap fail the committed
    student base (its greedy val accuracy from bootstrap.json) while the teacher clears them."""
    profile = yaml.safe_load((REPO / "profiles" / "toolcall.yaml").read_text())
    record = json.loads((REPO / "artifacts" / "toolcall" / "bootstrap.json").read_text())
    for path in (
        profile["models"]["teacher"]["path"], profile["models"]["student"]["path"],
        profile["task"]["prompts_file"], profile["evaluate"]["embedded_path"],
    ):  # fmt: skip
        assert (REPO / path).exists(), path
    assert record["teacher"]["dir"] == profile["models"]["teacher"]["path"]
    assert record["student_base"]["dir"] == profile["models"]["student"]["path"]
    stage_keys = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for stage in ("bootstrap", "bootstrap_wide", "bootstrap_toolcall"):
        for key in stage_keys[stage]["params"]:
            node = profile
            for part in key.split("."):
                node = node.get(part) if isinstance(node, dict) else None
            assert node is None, f"the profile sets {key}, which re-runs {stage}"
    policy = PolicySpec.model_validate(yaml.safe_load((REPO / profile["gate"]["policy"]).read_text()))
    (suite,) = profile["evaluate"]["suites"]
    rule = policy.suites[suite["name"]]
    base, teacher = record["student_base"]["val_acc"], record["teacher"]["val_acc"]
    assert base < rule.floor < teacher
    assert teacher - base > rule.max_teacher_gap


def test_profile_merged_into_params_selects_the_tool_call_task(tmp_path: Path) -> None:
    """params.yaml deep-merged with the profile validates and selects the task, its val split and its grader."""
    if "grader" not in EvalSuite.model_fields:
        pytest.skip("evaluate.suites[].grader arrives with the suites change (issue 17 item 2)")
    merged = _deep_merge(
        yaml.safe_load((REPO / "params.yaml").read_text()),
        yaml.safe_load((REPO / "profiles" / "toolcall.yaml").read_text()),
    )
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(merged))
    params = load_params(tmp_path / "params.yaml")
    assert params.task.name == "toolcall" and params.gate.model_name == "oprd-toolcall"
    assert params.evaluate.suites[0].grader == "tool_call"
    assert params.task.toolcall == load_params(REPO / "params.yaml").task.toolcall
