"""exact, regex and json_schema graders: what each accepts, what it refuses and why, and bad references."""

from __future__ import annotations

import json
import time

import pytest

from pipelines.graders import (
    GRADERS,
    InvalidReference,
    UnknownGrader,
    check_reference,
    grade,
    grade_result,
    grader_version,
    known_graders,
)
from pipelines.graders.json_values import extract_json, json_equal


def test_registry_has_every_builtin_grader_with_a_version():
    assert known_graders() == ["code_tests", "exact", "json_schema", "math", "regex", "tool_call"]
    for name in known_graders():
        assert grader_version(name)
        assert GRADERS[name].name == name
    with pytest.raises(UnknownGrader, match="did you mean 'regex'"):
        grade("regexp", "a", "a")


# ------------------------------------------------------------------------------------------------ exact


def test_exact_normalizes_whitespace_only():
    assert grade("exact", "  New\n  York ", "New York")
    assert grade("exact", "a\tb", "a b")
    result = grade_result("exact", "new york", "New York")
    assert not result.correct and "letter case" in result.reason
    assert not grade("exact", "New York.", "New York")
    assert not grade("exact", "NewYork", "New York")


def test_exact_rejects_empty_reference():
    with pytest.raises(InvalidReference):
        check_reference("exact", "   ")


# ------------------------------------------------------------------------------------------------ regex


def test_regex_is_a_full_match():
    assert grade("regex", " 42 ", r"\d+")
    result = grade_result("regex", "42 apples", r"\d+")
    assert not result.correct and "does not fully match" in result.reason
    assert grade("regex", "YES", r"(?i)yes")
    assert not grade("regex", "YES", r"yes")


def test_regex_that_does_not_compile_is_an_invalid_reference():
    with pytest.raises(InvalidReference, match="does not compile"):
        check_reference("regex", r"(unclosed")
    with pytest.raises(InvalidReference, match="does not compile"):
        grade("regex", "x", r"[z-a]")


def test_regex_catastrophic_backtracking_is_stopped():
    pattern = r"(a|aa)+b?c"  # exponential on a...ad in a backtracking engine (re and regex alike)
    start = time.monotonic()
    result = grade_result("regex", "a" * 60 + "d", pattern)
    assert not result.correct
    assert "catastrophic backtracking" in result.reason
    assert time.monotonic() - start < 30


def test_regex_refuses_huge_responses():
    result = grade_result("regex", "a" * 200_000, r"a+")
    assert not result.correct and "more than" in result.reason


# ------------------------------------------------------------------------------------------------ json_schema

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 0},
        "tags": {"type": "array"},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}


def test_json_schema_validates_the_response():
    ref = {"schema": SCHEMA}
    assert grade("json_schema", '{"name": "Ann", "age": 3}', ref)
    result = grade_result("json_schema", '{"name": "Ann", "age": -1}', ref)
    assert not result.correct and "$.age" in result.reason and "minimum" in result.reason
    result = grade_result("json_schema", '{"name": "Ann"}', ref)
    assert not result.correct and "'age' is a required property" in result.reason
    assert not grade("json_schema", '{"name": "Ann", "age": 3, "extra": 1}', ref)
    result = grade_result("json_schema", "no json here", ref)
    assert not result.correct and "no JSON" in result.reason


def test_json_schema_finds_fenced_block_then_last_value():
    ref = {"schema": SCHEMA, "expected": {"name": "Ann", "age": 3}}
    text = 'Draft: {"name": "Bob", "age": 1}\nFixed:\n```json\n{"age": 3, "name": "Ann"}\n```\nDone {"x": 1}'
    assert grade("json_schema", text, ref)
    assert grade("json_schema", 'Draft {"name": "Bob", "age": 1} then final {"name": "Ann", "age": 3.0}', ref)
    assert not grade("json_schema", '{"name": "Ann", "age": 3} and later {"name": "Bob", "age": 1}', ref)
    result = grade_result("json_schema", "```json\n{broken\n```", ref)
    assert not result.correct and "not valid JSON" in result.reason


def test_json_schema_expected_uses_json_equality():
    schema = {"type": "object"}
    ref = {"schema": schema, "expected": {"a": 1, "b": [1, {"c": True}]}}
    assert grade("json_schema", '{"b": [1.0, {"c": true}], "a": 1.0}', ref)  # key order, 1 == 1.0
    result = grade_result("json_schema", '{"a": 1, "b": [1, {"c": 1}]}', ref)  # true != 1
    assert not result.correct and "differs from the expected value" in result.reason
    assert not grade("json_schema", '{"a": 1, "b": [{"c": true}, 1]}', ref)  # array order matters
    assert not grade("json_schema", '{"a": 1, "b": [1, {"c": true}], "d": null}', ref)


def test_json_equal_rules():
    assert json_equal(1, 1.0) and json_equal({"a": [1]}, {"a": [1.0]})
    assert not json_equal(True, 1) and not json_equal(0, False) and not json_equal(None, 0)
    assert not json_equal("1", 1)


def test_json_extraction_refuses_nan():
    with pytest.raises(ValueError, match="not valid JSON"):
        extract_json('```json\n{"a": NaN}\n```')


def test_json_schema_checks_formats():
    ref = {"schema": {"type": "string", "format": "date"}}
    assert grade("json_schema", '"2026-12-03"', ref)
    assert not grade("json_schema", '"03/12/2026"', ref)


@pytest.mark.parametrize(
    ("reference", "message"),
    [
        ({"schema": {"type": "strin"}}, "not a valid JSON Schema"),
        ({"schema": {"minimum": "zero"}}, "not a valid JSON Schema"),
        ({"schema": SCHEMA, "expected": {"name": "Ann"}}, "does not validate against its own schema"),
        ({"schema": SCHEMA, "expect": {}}, "unknown keys"),
        ({"expected": 1}, "must be an object"),
        ("{not json", "not valid JSON"),
        ([1, 2], "must be an object"),
    ],
)
def test_json_schema_invalid_references(reference, message):
    with pytest.raises(InvalidReference, match=message):
        check_reference("json_schema", reference)


def test_json_schema_reference_may_be_json_text():
    ref = json.dumps({"schema": SCHEMA, "expected": {"name": "Ann", "age": 3}})
    assert grade("json_schema", '{"name": "Ann", "age": 3}', ref)
