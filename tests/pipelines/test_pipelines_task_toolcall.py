"""The embedded tool-call task: generator, BFCL references, the local structural check and the tokenizer."""

import json
import random
import re
from pathlib import Path

import pytest
from transformers import AutoTokenizer, Qwen2Config

from pipelines.task_toolcall import (
    CATALOG,
    MAX_NEW_TOKENS,
    MAX_SEQUENCE_TOKENS,
    NUMBER_WORDS,
    ToolProblem,
    build_tokenizer,
    check_response,
    make_splits,
    parse_calls,
    sample_problem,
)


def _draws(n: int, seed: int = 0) -> list[ToolProblem]:
    rng = random.Random(seed)
    return [sample_problem(rng) for _ in range(n)]


# ------------------------------------------------------------------------------------------------ generator
def test_splits_are_deterministic_disjoint_and_eval_independent_of_train_size() -> None:
    """Same seed -> same splits; no prompt twice anywhere; growing train keeps val/eval; another seed differs."""
    a, b = make_splits(3, 300, 50, 80), make_splits(3, 300, 50, 80)
    assert [p.prompt for p in a.train + a.val + a.eval] == [p.prompt for p in b.train + b.val + b.eval]
    assert (len(a.train), len(a.val), len(a.eval)) == (300, 50, 80)
    prompts = [p.prompt for p in a.train + a.val + a.eval]
    assert len(set(prompts)) == len(prompts)
    bigger = make_splits(3, 900, 50, 80)
    assert [p.prompt for p in bigger.eval + bigger.val] == [p.prompt for p in a.eval + a.val]
    assert [p.prompt for p in make_splits(4, 300, 50, 80).eval] != [p.prompt for p in a.eval]
    with pytest.raises(ValueError, match="num_val"):
        make_splits(0, 10, 0, 10)


def test_references_have_the_bfcl_possible_answer_layout() -> None:
    """One {function: {arg: [acceptable]}} per call, catalog functions and arguments only, every required
    argument present without "", "" only on optional ones, JSON-serializable (the suite rows carry it as is)."""
    for p in _draws(3000):
        ref = p.reference
        assert isinstance(ref, list) and len(ref) == len(p.calls) >= 1
        assert json.loads(json.dumps(ref)) == ref
        for entry in ref:
            ((name, args),) = entry.items()
            spec = {q.name: q for q in CATALOG[name]}
            assert set(args) <= set(spec)
            for arg, acceptable in args.items():
                assert isinstance(acceptable, list) and acceptable
                assert ("" in acceptable) == (
                    not spec[arg].required and len(acceptable) <= 2 and acceptable[0] == ""
                )
            assert all(q.name in args for q in spec.values() if q.required)


def test_gold_response_satisfies_its_reference_and_omits_unmentioned_optionals() -> None:
    """The SFT target passes the local check; an argument the reference marks omittable is absent from it."""
    draws = _draws(3000)
    for p in draws:
        ok, why = check_response(p.response, p.reference)
        assert ok, (p.prompt, p.response, why)
        for (name, given), entry in zip(parse_calls(p.response), p.reference, strict=True):
            assert name in entry
            assert all(arg not in given for arg, acceptable in entry[name].items() if "" in acceptable)
    sizes = [len(p.calls) for p in draws]
    assert 0.5 < sizes.count(1) / len(sizes) < 0.7 and 2 in sizes and 3 in sizes  # parallel requests exist
    assert any(re.fullmatch(r"\[.*\]", p.response) for p in draws if len(p.calls) > 1)


def _minutes_from_words(text: str) -> int:
    """An independent reading of the duration phrases the timer templates use."""
    words = {w: i + 1 for i, w in enumerate(NUMBER_WORDS)} | {"an": 1}
    if m := re.search(r"(\d+) hours? and (\d+) minutes", text):
        return 60 * int(m[1]) + int(m[2])
    if m := re.search(r"(\d+) and a half hours", text):
        return 60 * int(m[1]) + 30
    if "half an hour" in text:
        return 30
    if m := re.search(r"(\d+|an|one) hours?\b", text):
        return 60 * (int(m[1]) if m[1].isdigit() else words[m[1]])
    m = re.search(r"(\d+|one) minutes?\b", text)
    assert m, text
    return int(m[1]) if m[1].isdigit() else 1


def test_transformations_match_an_independent_reading_of_the_request() -> None:
    """Durations become minutes, spoken times 24-hour "HH:MM", number words integers, currencies ISO codes."""
    seen = set()
    for p in _draws(4000, seed=1):
        if len(p.calls) != 1:
            continue
        call = p.calls[0]
        args = dict(call.args)
        seen.add(call.name)
        if call.name == "set_timer":
            assert args["minutes"] == _minutes_from_words(p.prompt), p.prompt
        elif call.name == "book_table":
            m = re.search(r"at (noon|(\d+)(?::(\d+))? (am|pm))", p.prompt)
            assert m, p.prompt
            hour = 12 if m[1] == "noon" else int(m[2]) + (12 if m[4] == "pm" else 0)
            assert args["time"] == f"{hour:02d}:{m[3] or '00'}", p.prompt
            spoken = re.search(r"for (\w+)", p.prompt)[1]
            assert args["people"] == (int(spoken) if spoken.isdigit() else NUMBER_WORDS.index(spoken) + 1)
        elif call.name == "convert_currency":
            codes = {"dollars": "usd", "euros": "eur", "pounds": "gbp", "yen": "jpy", "francs": "chf"}
            codes |= {"rupees": "inr", "pesos": "mxn"}
            amount = re.search(r"\d+", p.prompt)[0]
            source = re.search(rf"{amount} (\w+)", p.prompt)[1]
            assert (args["amount"], args["source"]) == (int(amount), codes[source])
            assert args["target"] in {codes[w] for w in p.prompt.split() if w in codes} - {codes[source]}
        elif call.name == "get_weather":
            assert args["city"] in p.prompt and args.get("unit", "") in p.prompt
        elif call.name == "play_music":
            assert args["artist"] in p.prompt and ("shuffle" in args) == ("shuffle" in p.prompt)
    assert seen == set(CATALOG)


# ------------------------------------------------------------------------------------------------- the check
WEATHER2 = [
    {"get_weather": {"city": ["paris"], "unit": ["", "celsius"]}},
    {"get_weather": {"city": ["rome"], "unit": ["", "celsius"]}},
]
TIMER = [{"set_timer": {"minutes": [120], "label": [""]}}]


@pytest.mark.parametrize(
    ("response", "reference", "expected"),
    [
        ('[get_weather(city="paris"), get_weather(city="rome")]', WEATHER2, True),
        ('[get_weather(city="rome"), get_weather(city="paris")]', WEATHER2, True),  # order-free
        (
            '[get_weather(city="rome", unit="celsius"), get_weather(city="Paris")]',
            WEATHER2,
            True,
        ),  # default, case
        ('get_weather(city="paris")', WEATHER2, False),  # a call missing
        ('[get_weather(city="paris"), get_weather(city="paris")]', WEATHER2, False),  # a dict used twice
        ('[get_weather(city="paris"), get_weather(city="rome", unit="fahrenheit")]', WEATHER2, False),
        ("set_timer(minutes=120)", TIMER, True),
        ('set_timer(minutes=120, label="tea")', TIMER, False),  # value not among the acceptable ones
        ("set_timer(minutes=120, seconds=0)", TIMER, False),  # unknown argument
        ("set_timer()", TIMER, False),  # missing required argument
        ('set_timer(minutes="120")', TIMER, False),  # wrong type
        ("set_timer(minutes=True)", [{"set_timer": {"minutes": [1]}}], False),  # bool is not an integer
        ("set_timer(120)", TIMER, False),  # positional
        ("play_music(minutes=120)", TIMER, False),  # wrong function
        ("set_timer(minutes=60*2)", TIMER, False),  # not a literal: never evaluated
        ("the timer is set", TIMER, False),
        ("", TIMER, False),
        ("[" * 5000 + "]" * 5000, TIMER, False),  # hostile nesting: a reason, not a crash
    ],
)
def test_check_response_has_bfcl_semantics(response: str, reference: list, expected: bool) -> None:
    """Each rule of the BFCL AST checker: order-free parallel calls, optional/default, no extra or missing
    argument, type and value, function name; non-calls and non-literals are wrong (with a reason)."""
    ok, why = check_response(response, reference)
    assert ok is expected, why
    assert (why == "ok") is expected and why


# ------------------------------------------------------------------------------------------------- tokenizer
def test_tokenizer_roundtrips_every_generated_text_without_unknowns() -> None:
    """decode(encode(x)) == x for prompts and responses of all splits; no <unk>; lengths fit the model."""
    tok = build_tokenizer()
    splits = make_splits(0, 2000, 200, 500)
    longest_prompt = longest_response = 0
    for p in splits.train + splits.val + splits.eval + _draws(5000, seed=7):
        for text in (p.prompt, p.response):
            ids = tok(text)["input_ids"]
            assert ids[0] == tok.bos_token_id and tok.unk_token_id not in ids
            assert tok.decode(ids, skip_special_tokens=True) == text
        longest_prompt = max(longest_prompt, len(tok(p.prompt)["input_ids"]))
        longest_response = max(longest_response, len(tok(p.response, add_special_tokens=False)["input_ids"]))
    assert longest_response + 1 <= MAX_NEW_TOKENS  # + EOS
    assert longest_prompt + MAX_NEW_TOKENS <= MAX_SEQUENCE_TOKENS
    pieces = tok.convert_ids_to_tokens(tok("weather in new york", add_special_tokens=False)["input_ids"])
    assert pieces == ["weather", " in", " new", " york"]  # a word carries its space: one token per word


def test_tokenizer_loads_with_stock_autotokenizer_next_to_a_qwen2_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Saved next to a Qwen2 config (as in every model directory), stock AutoTokenizer (offline) gives the same
    vocabulary, specials, ids and decoded text: transformers rebuilds it as Qwen2Tokenizer, which without the
    added-token declaration splits words into letters and turns the space into an unknown Ġ."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tok = build_tokenizer()
    tok.save_pretrained(tmp_path)
    Qwen2Config(vocab_size=len(tok)).save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded.get_vocab() == tok.get_vocab() and len(reloaded) == len(tok)
    assert (reloaded.pad_token_id, reloaded.bos_token_id, reloaded.eos_token_id) == (0, 1, 2)
    assert reloaded.padding_side == "left"
    for p in _draws(400, seed=5):
        for text in (p.prompt, p.response):
            ids = reloaded(text)["input_ids"]
            assert ids == tok(text)["input_ids"], text
            assert reloaded.decode(ids, skip_special_tokens=True) == text
