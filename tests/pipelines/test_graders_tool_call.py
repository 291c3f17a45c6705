"""tool_call grader: BFCL gold answers pass, shuffled/broken ones fail, with reasons."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipelines.graders import InvalidReference, check_reference, grade, grade_result
from pipelines.graders.tool_call import parse_calls

BFCL = [
    json.loads(line)
    for line in (Path(__file__).parents[1] / "data" / "bfcl_v4_possible_answers_subset.jsonl")
    .read_text()
    .splitlines()
]


def first(value):
    """An acceptable value as a model writes it: a dict value maps keys to acceptable values, take the first."""
    if isinstance(value, dict):
        return {k: options[0] for k, options in value.items() if options[0] != ""}
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        return [first(v) for v in value]
    return value


def gold_calls(ground_truth: list) -> list[tuple[str, dict]]:
    """The response a model should give: the first acceptable value of every argument ("" = leave it out)."""
    calls = []
    for call in ground_truth:
        ((name, params),) = call.items()
        calls.append((name, {arg: first(options[0]) for arg, options in params.items() if options[0] != ""}))
    return calls


def as_python(calls) -> str:
    text = ", ".join(f"{name}({', '.join(f'{k}={v!r}' for k, v in args.items())})" for name, args in calls)
    return f"[{text}]"


def as_json(calls) -> str:
    return json.dumps([{"name": name, "arguments": args} for name, args in calls])


def required(params: dict) -> list[str]:
    return [arg for arg, options in params.items() if "" not in options]


def wrong(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, int | float):
        return value + 12345
    if isinstance(value, str):
        return value + " zzz"
    if isinstance(value, list):
        return [*value, "zzz"]
    if isinstance(value, dict):
        return {**value, "zzz": 1}
    raise AssertionError(value)


def test_bfcl_subset_covers_the_four_categories():
    kinds = {row["id"].rsplit("_", 1)[0] for row in BFCL}
    assert kinds == {"simple_python", "multiple", "parallel", "parallel_multiple"}
    assert len(BFCL) == 200


@pytest.mark.parametrize("render", [as_python, as_json], ids=["python", "json"])
def test_bfcl_gold_answers_pass(render):
    for row in BFCL:
        check_reference("tool_call", row["ground_truth"])
        response = render(gold_calls(row["ground_truth"]))
        result = grade_result("tool_call", response, row["ground_truth"])
        assert result.correct, (row["id"], response, result.reason)


def test_bfcl_parallel_gold_answers_pass_in_any_order():
    for row in BFCL:
        calls = gold_calls(row["ground_truth"])
        if len(calls) > 1:
            assert grade("tool_call", as_python(list(reversed(calls))), row["ground_truth"]), row["id"]


def test_another_problems_answer_fails():
    failed = 0
    for row, other in zip(BFCL, BFCL[1:] + BFCL[:1], strict=True):
        if other["ground_truth"] == row["ground_truth"]:
            continue
        result = grade_result("tool_call", as_python(gold_calls(other["ground_truth"])), row["ground_truth"])
        assert not result.correct, (row["id"], other["id"])
        assert result.reason
        failed += 1
    assert failed >= 190


def _mutated(row, mutate) -> str | None:
    """The gold response with ``mutate(name, params, args)`` applied to the first call it changes (or None)."""
    calls = gold_calls(row["ground_truth"])
    for i, call in enumerate(row["ground_truth"]):
        ((name, params),) = call.items()
        args = mutate(name, params, dict(calls[i][1]))
        if args is not None:
            calls[i] = (calls[i][0], args)
            return as_python(calls)
    return None


def test_dropped_required_argument_fails():
    def drop(name, params, args):
        need = [a for a in required(params) if a in args]
        return {k: v for k, v in args.items() if k != need[0]} if need else None

    checked = 0
    for row in BFCL:
        response = _mutated(row, drop)
        if response is not None:
            result = grade_result("tool_call", response, row["ground_truth"])
            assert not result.correct and "missing required argument" in result.reason, (row["id"], result)
            checked += 1
    assert checked >= 190


def test_extra_argument_fails():
    for row in BFCL:
        response = _mutated(row, lambda name, params, args: {**args, "zz_not_a_parameter": 1})
        result = grade_result("tool_call", response, row["ground_truth"])
        assert not result.correct and "zz_not_a_parameter" in result.reason, (row["id"], result)


def test_wrong_value_fails():
    def change(name, params, args):
        need = [a for a in required(params) if a in args]
        return {**args, need[0]: wrong(args[need[0]])} if need else None

    checked = 0
    for row in BFCL:
        response = _mutated(row, change)
        if response is not None:
            result = grade_result("tool_call", response, row["ground_truth"])
            assert not result.correct, (row["id"], response)
            checked += 1
    assert checked >= 190


def test_wrong_number_of_calls_fails():
    for row in BFCL:
        calls = gold_calls(row["ground_truth"])
        fewer = calls[:-1] if len(calls) > 1 else [*calls, calls[0]]
        result = grade_result("tool_call", as_python(fewer), row["ground_truth"])
        assert not result.correct and "call(s)" in result.reason, row["id"]


REF = [{"math.hypot": {"x": [4], "y": [5], "z": ["", 0]}}]


@pytest.mark.parametrize(
    "response",
    [
        "math.hypot(x=4, y=5)",
        "[math.hypot(x=4, y=5, z=0)]",
        'Sure.\n```json\n{"name": "math.hypot", "arguments": {"x": 4, "y": 5}}\n```',
        '{"name": "math.hypot", "parameters": {"x": 4, "y": 5}}',
        '{"tool_calls": [{"type": "function", "function": {"name": "math_hypot", "arguments": "{\\"x\\": 4, \\"y\\": 5}"}}]}',
        "<TOOLCALL>[math.hypot(x=4, y=5)]</TOOLCALL>",
        "```python\nmath.hypot(x=4, y=5)\n```",
    ],
)
def test_accepted_formats(response):
    assert grade_result("tool_call", response, REF) == grade_result("tool_call", "math.hypot(x=4, y=5)", REF)
    assert grade("tool_call", response, REF)


@pytest.mark.parametrize(
    ("response", "reason"),
    [
        ("math.hypot(x=4.0, y=5)", "type float, expected integer"),  # float for int: BFCL type error
        ("math.hypot(x=True, y=5)", "type boolean"),  # bool is not a number
        ("math.hypot(4, 5)", "positional"),
        ("math.hypot(x=__import__('os').getpid(), y=5)", "not a literal"),
        ("math.pow(x=4, y=5)", "expected 'math.hypot'"),
        ("the answer is 6.4", "could not parse"),
        ("math.hypot(x=4, y=5); math.hypot(x=4, y=5)", "expected 1 call(s), got 2"),
    ],
)
def test_rejections_say_why(response, reason):
    result = grade_result("tool_call", response, REF)
    assert not result.correct
    assert reason in result.reason, result.reason


def test_bfcl_string_and_float_rules():
    ref = [{"weather.get": {"city": ["San Francisco, CA"], "days": [3.0], "units": [["C", "F"]]}}]
    assert grade(
        "tool_call", "weather.get(city='san francisco ca', days=3, units=['c', 'f'])", ref
    )  # int for float
    assert not grade("tool_call", "weather.get(city='Los Angeles', days=3, units=['C', 'F'])", ref)
    assert not grade("tool_call", "weather.get(city='San Francisco', days=3, units=['F', 'C'])", ref)


def test_dict_and_list_of_dict_arguments():
    ref = [{"book": {"room": [{"type": ["double"], "view": ["sea", ""]}], "guests": [[{"name": ["Ann"]}]]}}]
    assert grade("tool_call", "book(room={'type': 'Double'}, guests=[{'name': 'ann'}])", ref)
    assert not grade("tool_call", "book(room={'type': 'double', 'pets': 1}, guests=[{'name': 'Ann'}])", ref)
    assert not grade("tool_call", "book(room={'view': 'sea'}, guests=[{'name': 'Ann'}])", ref)
    assert not grade("tool_call", "book(room={'type': 'double'}, guests=[{'name': 'Bob'}])", ref)


def test_python_parser_never_evaluates():
    calls = parse_calls("f(a=[1, -2.5, {'k': (1, 2)}], b=None)")
    assert calls == [("f", {"a": [1, -2.5, {"k": (1, 2)}], "b": None})]
    with pytest.raises(ValueError, match="not a literal"):
        parse_calls("f(a=open('/etc/passwd').read())")


@pytest.mark.parametrize(
    "reference",
    [
        {"math.hypot": {"x": [4]}},  # not a list
        [{"math.hypot": {"x": 4}}],  # values not a list
        [{"f": {"x": [1]}, "g": {}}],  # two functions in one call
        [],
        "[not json",
    ],
)
def test_invalid_references(reference):
    with pytest.raises(InvalidReference):
        check_reference("tool_call", reference)


def test_bfcl_line_with_id_is_accepted_as_reference():
    row = BFCL[0]
    assert grade("tool_call", as_python(gold_calls(row["ground_truth"])), json.dumps(row))
