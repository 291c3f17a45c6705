"""End-to-end evaluation of tiny saved models: metric ranges, exact values for a scripted model, output files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from prefix_grader import prefix_grader_fixture  # noqa: F401 (the prefix_grader fixture)
from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

from pipelines.eval_metrics import avg_at_k, pass_at_k
from pipelines.evaluation import (
    METRIC_KEYS,
    encode_prompt,
    evaluate_loaded,
    evaluate_model,
    prompt_suffix_for,
    with_suffix,
    write_eval_outputs,
)
from pipelines.suites import EvalProblem, load_suite
from pipelines.task import build_tokenizer
from trainer.config import EvalSuite, EvaluateConfig

PROBLEMS = [
    ("e0", "55+84-37+74=", "176"),
    ("e1", "89+42-78=", "53"),
    ("e2", "41+51+18+34=", "144"),
    ("e3", "90+90-4=", "176"),
    ("e4", "10+20=", "30"),
]


def _tiny_model(tokenizer, seed: int = 0) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    cfg = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return Qwen2ForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved random tiny model (task tokenizer) and a 5-problem embedded eval set."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("eval")
    tokenizer = build_tokenizer()
    model = _tiny_model(tokenizer)
    model.save_pretrained(root / "model", safe_serialization=True)
    tokenizer.save_pretrained(root / "model")
    (root / "eval.jsonl").write_text(
        "".join(json.dumps({"id": i, "prompt": p, "answer": a}) + "\n" for i, p, a in PROBLEMS)
    )
    return root


def _cfg(root: Path, **kw) -> EvaluateConfig:
    base = {"k": 3, "max_new_tokens": 8, "batch_size": 2, "temperature": 1.0, "top_p": 0.95, "seed": 5}
    return EvaluateConfig(embedded_path=str(root / "eval.jsonl"), **(base | kw))


def test_evaluate_random_model_end_to_end(workspace: Path) -> None:
    cfg = _cfg(workspace)
    suites = [EvalSuite(name="embedded")]
    summary, rows = evaluate_model(workspace / "model", suites, cfg, "student", progress=False)
    m = summary["embedded"]
    assert list(m) == list(METRIC_KEYS)
    assert m["n_problems"] == 5 and m["k"] == 3
    for key in ("avg_at_k", "pass_at_k", "best_at_k", "dist_4g"):
        assert 0.0 <= m[key] <= 1.0
    assert m["avg_at_k_ci95"][0] <= m["avg_at_k"] <= m["avg_at_k_ci95"][1]
    assert 1.0 <= m["median_length"] <= m["p95_length"] <= 8.0 and 1.0 <= m["mean_length"] <= 8.0
    assert [r.problem_id for r in rows] == ["e0", "e1", "e2", "e3", "e4"]
    assert all(len(r.responses) == 3 and len(r.lengths) == 3 and r.n_correct == sum(r.correct) for r in rows)

    again, rows_again = evaluate_model(workspace / "model", suites, cfg, "student", progress=False)
    assert again == summary and [r.responses for r in rows_again] == [r.responses for r in rows]

    out = workspace / "out"
    tree = write_eval_outputs(
        {"student": (summary, rows)},
        out / "metrics" / "eval.json",
        out / "artifacts" / "eval" / "per_problem.jsonl",
        out / "artifacts" / "eval" / "responses.jsonl",
    )
    on_disk = json.loads((out / "metrics" / "eval.json").read_text())
    assert on_disk == tree and set(on_disk) == {"embedded"} and set(on_disk["embedded"]) == {"student"}
    assert set(on_disk["embedded"]["student"]) == set(METRIC_KEYS)
    per_problem = [
        json.loads(line) for line in (out / "artifacts/eval/per_problem.jsonl").read_text().splitlines()
    ]
    assert len(per_problem) == 5
    assert all(
        set(r) == {"suite", "role", "problem_id", "k", "n_correct", "mean_length"} for r in per_problem
    )
    assert per_problem[0]["suite"] == "embedded" and per_problem[0]["role"] == "student"
    responses = [
        json.loads(line) for line in (out / "artifacts/eval/responses.jsonl").read_text().splitlines()
    ]
    assert responses[0]["responses"] == rows[0].responses


def _scripted(model: Qwen2ForCausalLM, tokenizer, script: str) -> Qwen2ForCausalLM:
    """Make ``model`` answer every task prompt with ``script`` + EOS, whatever it samples.

    A forward hook keys the next token on the last input token (the prompt always ends in ``=``), so the KV-cached
    generate loop walks the chain ``= -> tokens of script -> </s>``.
    """
    ids = [tokenizer.convert_tokens_to_ids("=")] + tokenizer(script, add_special_tokens=False)["input_ids"]
    nxt = dict(zip(ids, [*ids[1:], tokenizer.eos_token_id], strict=True))
    assert len(nxt) == len(ids), "script tokens must be distinct for the chain to be unambiguous"

    def hook(_mod, args, kwargs, out):
        last = (kwargs.get("input_ids") if kwargs.get("input_ids") is not None else args[0])[:, -1]
        logits = torch.full_like(out.logits[:, -1, :], -1e4)
        for row, tok in enumerate(last.tolist()):
            logits[row, nxt.get(tok, tokenizer.eos_token_id)] = 0.0
        out.logits[:, -1, :] = logits
        return out

    model.register_forward_hook(hook, with_kwargs=True)
    return model


def test_scripted_model_gives_hand_computed_metrics(workspace: Path) -> None:
    tokenizer = build_tokenizer()
    model = _scripted(_tiny_model(tokenizer), tokenizer, "8 \\boxed{176}")
    cfg = _cfg(workspace, k=4, max_new_tokens=12)
    summary, rows = evaluate_loaded(
        model, tokenizer, [EvalSuite(name="embedded")], cfg, "teacher", progress=False
    )
    m = summary["embedded"]
    # Every response is "8 \boxed{176}" (7 tokens + EOS = 8); the answer is right for e0 and e3 only.
    assert [r.n_correct for r in rows] == [4, 0, 0, 4, 0]
    assert rows[0].responses == ["8 \\boxed{176}"] * 4
    assert m["avg_at_k"] == pytest.approx(0.4) and m["best_at_k"] == pytest.approx(0.4)
    assert m["pass_at_k"] == pytest.approx(0.4)
    assert m["mean_length"] == m["median_length"] == m["p95_length"] == 8.0
    assert m["dist_4g"] == 0.0  # two whitespace words per response: no 4-grams


def test_prompt_encoding_matches_task_tokenizer() -> None:
    tokenizer = build_tokenizer()
    assert encode_prompt(tokenizer, "12+3=", chat=False) == tokenizer("12+3=")["input_ids"]
    assert (
        encode_prompt(tokenizer, "12+3=", chat=True) == tokenizer("12+3=")["input_ids"]
    )  # no template: plain


def test_chat_template_is_applied_for_benchmarks(workspace: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(workspace / "model")
    tokenizer.chat_template = (
        "{% for m in messages %}{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}={% endif %}"
    )
    ids = encode_prompt(tokenizer, "1+2", chat=True)
    assert tokenizer.decode(ids) == "1+2="  # no BOS added on top of the template's text


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"role": "intern"}, "role must be one of"),
        ({"suites": []}, "no eval suites"),
        ({"suites": [EvalSuite(name="a"), EvalSuite(name="a")]}, "must be unique"),
    ],
)
def test_bad_arguments(workspace: Path, kwargs, match: str) -> None:
    args = {"suites": [EvalSuite(name="embedded")], "role": "student"} | kwargs
    with pytest.raises(ValueError, match=match):
        evaluate_model(workspace / "model", args["suites"], _cfg(workspace), args["role"], progress=False)


def test_prompts_too_long_for_the_model_are_a_clear_error(workspace: Path) -> None:
    aime = Path(__file__).resolve().parents[2] / "data" / "benchmarks" / "AIME24.json"
    suites = [EvalSuite(name="aime24", path=str(aime), limit=2)]
    tokenizer = build_tokenizer()  # one token per character: AIME prompts are hundreds of tokens long
    with pytest.raises(ValueError, match=r"aime24.*max_position_embeddings=64"):
        evaluate_loaded(_tiny_model(tokenizer), tokenizer, suites, _cfg(workspace), "student", progress=False)


def test_not_a_model_dir(tmp_path: Path, workspace: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"no config\.json"):
        evaluate_model(tmp_path, [EvalSuite(name="embedded")], _cfg(workspace), "student", progress=False)


def test_prompt_suffix_is_appended_once() -> None:
    suffix = EvaluateConfig().prompt_suffix
    assert with_suffix("Find x.", suffix) == "Find x." + suffix
    assert with_suffix("Find x." + suffix + "\n", suffix) == "Find x." + suffix + "\n"  # AIMO already has it
    assert with_suffix("Find x.", "") == "Find x."


def test_a_suite_of_another_task_runs_through_evaluate_model(
    tiny_pair, tmp_path: Path, prefix_grader: str
) -> None:
    """A JSONL suite graded by a non-math grader (rows carry structured references, one row overrides the grader)
    goes through the evaluate path unchanged: k samples, Avg@k with its CI, pass@k, lengths, per-sample verdicts."""
    rows = [
        {"id": "always", "prompt": "12+3=", "reference": {"prefix": ""}},
        {"id": "never", "prompt": "13+4=", "reference": '{"prefix": "x"}'},
        {"id": "one", "prompt": "14+5=", "reference": {"prefix": "1"}},
        {"id": "boxed", "prompt": "15+6=", "answer": "21", "grader": "math"},
    ]
    path = tmp_path / "tools.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    # evaluate.prompt_suffix is for math rows of file suites. This one (60 in-vocabulary tokens) would overflow the
    # tiny models' 64 positions if it were given to the rows of another grader: evaluating at all checks it is not.
    tools = EvalSuite(name="tools", path=str(path), grader=prefix_grader, limit=3)
    mixed = EvalSuite(name="mixed", path=str(path), grader=prefix_grader, prompt_suffix="")
    cfg = EvaluateConfig(
        k=4, max_new_tokens=6, batch_size=3, temperature=1.0, top_p=1.0, seed=3, prompt_suffix=" " + "0" * 59
    )
    summary, results = evaluate_model(tiny_pair["teacher"], [tools, mixed], cfg, "student", progress=False)
    by_id = {(r.suite, r.problem_id): r for r in results}
    for suite in ("tools", "mixed"):
        assert by_id[(suite, "always")].correct == [True] * 4
        assert by_id[(suite, "never")].correct == [False] * 4
        one = by_id[(suite, "one")]
        assert one.correct == [t.startswith("1") for t in one.responses]  # each sample by the grader's rule
        assert [bool(reason) for reason in one.reasons] == [not c for c in one.correct]
        assert {r.grader for r in results if r.suite == suite and r.problem_id != "boxed"} == {prefix_grader}
    assert by_id[("mixed", "boxed")].grader == "math"
    assert by_id[("mixed", "boxed")].correct == [False] * 4  # no "\\" in the vocabulary: never a \\boxed{}
    for suite, n in (("tools", 3), ("mixed", 4)):
        m, counts = summary[suite], [r.n_correct for r in results if r.suite == suite]
        assert list(m) == list(METRIC_KEYS) and m["n_problems"] == n and m["k"] == 4
        assert m["avg_at_k"] == pytest.approx(avg_at_k(counts, 4))
        assert m["pass_at_k"] == pytest.approx(pass_at_k(counts, n=4, k=4))
        assert m["avg_at_k_ci95"][0] <= m["avg_at_k"] <= m["avg_at_k_ci95"][1]
        assert 1.0 <= m["mean_length"] <= 6.0

    out = tmp_path / "out"
    write_eval_outputs(
        {"student": (summary, results)}, out / "eval.json", out / "pp.jsonl", out / "resp.jsonl"
    )
    responses = [json.loads(line) for line in (out / "resp.jsonl").read_text().splitlines()]
    assert [(r["problem_id"], r["grader"]) for r in responses[:3]] == [
        (i, prefix_grader) for i in ("always", "never", "one")
    ]
    assert responses[1]["reasons"] == ["does not start with 'x'"] * 4


def test_prompt_suffix_applies_to_math_rows_of_file_suites(tmp_path: Path, prefix_grader: str) -> None:
    path = tmp_path / "s.jsonl"
    path.write_text(json.dumps({"prompt": "p", "answer": "1"}) + "\n")
    math_row = EvalProblem("0", "p", "1")
    tool_row = EvalProblem("1", "p", "{}", grader=prefix_grader, reference={"prefix": ""})
    file_suite = load_suite(EvalSuite(name="f", path=str(path)), path)
    embedded = load_suite(EvalSuite(name="embedded"), path)
    own = load_suite(EvalSuite(name="own", path=str(path), prompt_suffix=" Answer:"), path)
    assert prompt_suffix_for(file_suite, math_row, " S") == " S"
    assert prompt_suffix_for(file_suite, tool_row, " S") == ""
    assert prompt_suffix_for(embedded, math_row, " S") == ""
    assert prompt_suffix_for(own, tool_row, " S") == prompt_suffix_for(own, math_row, " S") == " Answer:"
