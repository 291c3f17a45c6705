"""``tool_call``: function calls in a response against a BFCL "possible answer".

Reference (BFCL v4 ``possible_answer`` layout, or a whole BFCL possible-answer line ``{"id", "ground_truth"}``)::

    [{"<function name>": {"<arg>": [<acceptable value>, ...], ...}}, ...]

An empty string ``""`` among an argument's acceptable values means the argument may be omitted; an argument without
``""`` is required. Several dicts are parallel calls, matched order-free. Function names may contain dots.

Response, either
* JSON (a fenced ```json block, the whole text, or the last JSON value in it): ``{"name": ..., "arguments": {...}}``
  (``"parameters"`` is accepted for ``"arguments"``; ``arguments`` may be a JSON string as in OpenAI tool calls; an
  OpenAI ``{"function": {...}}`` item or ``{"tool_calls": [...]}`` works too), or a list of them; or
* Python-style calls (a fenced ```python block or the text; a ``<TOOLCALL>...</TOOLCALL>`` span when present):
  ``f(a=1, b="x")``, ``[f(a=1), g(b=2)]``, or calls separated by ``;`` or newlines. They are parsed with
  :mod:`ast`, never evaluated: only keyword arguments whose values are literals (``ast.literal_eval``) are accepted.

Checking follows BFCL's AST checker (``bfcl_eval/eval_checker/ast_eval/ast_checker.py``, bfcl-eval 2026.3.23):
the number of calls must match; per call the function name (BFCL's dot-to-underscore form, ``math_hypot`` for
``math.hypot``, is accepted as models whose APIs forbid dots produce it), no unknown argument, every required
argument present, and every value acceptable:

* The expected type is that of the first non-``""`` acceptable value (BFCL takes it from the function spec,
  which a reference here does not carry). An ``int`` is accepted where a ``float`` is expected, a ``float`` is
  not accepted for an ``int``, ``bool`` is never a number, a tuple counts as a list.
* Strings compare after BFCL's ``standardize_string`` (case-insensitive; spaces and ``,./-_*^`` removed; ``'`` as
  ``"``), also as top-level elements of list values and as dict values.
* Dict values: every key must be an acceptable key with an acceptable value; keys without ``""`` are required.
  Lists of dicts compare dict by dict.
* Numbers inside lists and dicts compare by value (``1`` == ``1.0``); booleans only equal booleans.

Parallel calls are matched like BFCL's ``parallel_function_checker_no_order``: each expected call, in order, takes
the first not-yet-matched response call that satisfies it.
"""

from __future__ import annotations

import ast
import json
import re
from typing import Any

from pipelines.graders.base import Grader, GradeResult, InvalidReference
from pipelines.graders.json_values import MAX_JSON_RESPONSE_CHARS, extract_json, fenced_blocks, json_equal

__all__ = ["Call", "ToolCallGrader", "parse_calls", "standardize_string"]

Call = tuple[str, dict[str, Any]]
"""One parsed call: ``(function name, {argument: value})``."""

_STANDARDIZE = re.compile(r"[ \,\.\/\-\_\*\^]")
_TOOLCALL_TAG = re.compile(r"<TOOLCALL>(.*?)</TOOLCALL>", re.DOTALL)


def standardize_string(text: str) -> str:
    """BFCL's string normalization: drop spaces and ``,./-_*^``, lowercase, ``'`` -> ``"``."""
    return _STANDARDIZE.sub("", text).lower().replace("'", '"')


# ---------------------------------------------------------------------------------------------------- parsing


class _NotCalls(ValueError):
    """The text is not Python-style calls."""


def _call_name(node: ast.expr) -> str:
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        raise _NotCalls("a called object is not a (dotted) name")
    parts.append(node.id)
    return ".".join(reversed(parts))


def _python_call(node: ast.Call) -> Call:
    name = _call_name(node.func)
    if node.args:
        raise ValueError(f"call {name}(...) passes positional arguments; tool calls name every argument")
    args: dict[str, Any] = {}
    for kw in node.keywords:
        if kw.arg is None:
            raise ValueError(f"call {name}(...) uses **kwargs; tool calls name every argument")
        try:
            args[kw.arg] = ast.literal_eval(kw.value)
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            raise ValueError(
                f"argument {kw.arg!r} of {name}(...) is not a literal: {ast.unparse(kw.value)[:60]!r}"
            ) from None
    return name, args


def _python_calls(text: str) -> list[Call]:
    cleaned = text.strip().strip("'")
    try:
        tree = ast.parse(cleaned, mode="exec")
    except (SyntaxError, ValueError, MemoryError, RecursionError) as exc:
        raise _NotCalls(f"not Python syntax ({exc.__class__.__name__})") from None
    calls: list[Call] = []
    for stmt in tree.body:
        if not isinstance(stmt, ast.Expr):
            raise _NotCalls("a statement is not a call")
        value = stmt.value
        items = value.elts if isinstance(value, ast.List | ast.Tuple) else [value]
        for item in items:
            if not isinstance(item, ast.Call):
                raise _NotCalls("an element is not a call")
            calls.append(_python_call(item))
    if not calls:
        raise _NotCalls("no call")
    return calls


def _json_call(item: Any) -> Call:
    if isinstance(item, dict) and isinstance(item.get("function"), dict) and "name" not in item:
        item = item["function"]
    if not isinstance(item, dict):
        raise ValueError(f"a JSON call must be an object, got {type(item).__name__}")
    if "name" in item:
        name = item["name"]
        keys = [k for k in ("arguments", "parameters") if k in item]
        if len(keys) > 1:
            raise ValueError(f"call {name!r} has both 'arguments' and 'parameters'")
        args = item[keys[0]] if keys else {}
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                raise ValueError(f"the arguments of {name!r} are a string that is not JSON") from None
        extra = sorted(set(item) - {"name", "arguments", "parameters", "id", "type"})
        if extra:
            raise ValueError(f"call {name!r} has unexpected keys {extra}")
    elif len(item) == 1:  # BFCL's own decoded form {"<name>": {args}}
        ((name, args),) = item.items()
    else:
        raise ValueError(f'a JSON call needs "name" and "arguments", got keys {sorted(item)[:6]}')
    if not isinstance(name, str) or not name:
        raise ValueError(f"a function name must be a non-empty string, got {name!r}")
    if not isinstance(args, dict):
        raise ValueError(f"the arguments of {name!r} must be an object, got {type(args).__name__}")
    return name, args


def _json_calls(value: Any) -> list[Call]:
    if isinstance(value, dict) and "tool_calls" in value:
        value = value["tool_calls"]
    items = value if isinstance(value, list) else [value]
    return [_json_call(item) for item in items]


def parse_calls(response: str) -> list[Call]:
    """The calls in ``response`` (see the module docstring); ``ValueError`` saying why when it has none."""
    if len(response) > MAX_JSON_RESPONSE_CHARS:
        raise ValueError(f"response has {len(response)} characters, more than {MAX_JSON_RESPONSE_CHARS}")
    tagged = _TOOLCALL_TAG.search(response)
    text = tagged.group(1) if tagged else response
    blocks = [body for lang, body in fenced_blocks(text) if lang in ("python", "py", "tool_code", "")]
    python_text = blocks[-1] if blocks else text
    try:
        return _python_calls(python_text)
    except _NotCalls as not_python:
        try:
            value, _source = extract_json(text)
        except ValueError as exc:
            raise ValueError(
                f"neither Python-style calls ({not_python}) nor JSON calls ({exc}) in the response"
            ) from None
        return _json_calls(value)


# ---------------------------------------------------------------------------------------------------- checking


def _type_name(value: Any) -> str:
    return {bool: "boolean", int: "integer", float: "float", str: "string", list: "array", dict: "dict"}.get(
        type(value), type(value).__name__
    )


def _standardized(value: Any) -> Any:
    return standardize_string(value) if isinstance(value, str) else value


def _dict_matches(value: dict, acceptable: dict) -> str | None:
    """None when ``value`` satisfies one acceptable dict (BFCL's dict_checker), else why not."""
    for key, item in value.items():
        if key not in acceptable:
            return f"unexpected dict key {key!r}"
        options = [_standardized(o) for o in acceptable[key]]
        if not any(json_equal(_standardized(item), o) for o in options):
            return f"dict key {key!r} has value {item!r}, expected one of {acceptable[key]!r}"
    for key, options in acceptable.items():
        if key not in value and "" not in options:
            return f"dict key {key!r} is missing"
    return None


def _check_value(arg: str, value: Any, options: list) -> str | None:
    """None when ``value`` is acceptable for argument ``arg``, else the reason."""
    typed = [o for o in options if o != ""]
    if isinstance(value, tuple):
        value = list(value)
    if not typed:  # only "" (omit it): BFCL compares the value against the list as is
        return None if value == "" else f"argument {arg!r} should be omitted, got {value!r}"
    want = type(typed[0])
    if want is float and type(value) is int:
        value = float(value)  # BFCL: Python's int -> float
    if type(value) is not want:
        return f"argument {arg!r} has type {_type_name(value)}, expected {_type_name(typed[0])} (value {value!r})"
    if want is str:
        ok = standardize_string(value) in {standardize_string(o) for o in typed if isinstance(o, str)}
    elif want is dict:
        reasons = [_dict_matches(value, o) for o in typed if isinstance(o, dict)]
        if any(r is None for r in reasons):
            return None
        return f"argument {arg!r}: {reasons[0] if reasons else 'no acceptable dict'}"
    elif want is list and any(isinstance(x, dict) for o in typed if isinstance(o, list) for x in o):
        ok = any(
            isinstance(o, list)
            and len(o) == len(value)
            and all(
                isinstance(v, dict) and _dict_matches(v, a) is None for v, a in zip(value, o, strict=True)
            )
            for o in typed
        )
    elif want is list:
        got = [_standardized(x) for x in value]
        ok = any(isinstance(o, list) and json_equal(got, [_standardized(x) for x in o]) for o in typed)
    else:
        ok = any(json_equal(value, o) for o in typed)
    return None if ok else f"argument {arg!r} has value {value!r}, expected one of {typed!r}"


def _names_match(got: str, want: str) -> bool:
    return got == want or ("." in want and got == want.replace(".", "_"))


def check_call(call: Call, expected: dict[str, dict[str, list]]) -> str | None:
    """None when ``call`` satisfies the one-function dict ``expected``, else why not (BFCL simple checker)."""
    ((want_name, params),) = expected.items()
    name, args = call
    if not _names_match(name, want_name):
        return f"called {name!r}, expected {want_name!r}"
    for arg, options in params.items():
        if arg not in args and "" not in options:
            return f"{want_name}: missing required argument {arg!r}"
    for arg, value in args.items():
        if arg not in params:
            return f"{want_name}: unexpected argument {arg!r}"
        reason = _check_value(arg, value, params[arg])
        if reason is not None:
            return f"{want_name}: {reason}"
    return None


def _describe(call: Call) -> str:
    name, args = call
    return f"{name}({', '.join(f'{k}={v!r}' for k, v in args.items())})"[:120]


class ToolCallGrader(Grader):
    name = "tool_call"
    version = "1"
    structured = True

    def decode_reference(self, value: Any) -> Any:
        value = super().decode_reference(value)
        if isinstance(value, dict) and "ground_truth" in value:
            value = value["ground_truth"]
        return value

    def check_reference(self, reference: Any) -> None:
        layout = '[{"<function>": {"<arg>": [<acceptable values>]}}, ...] (BFCL possible-answer layout)'
        if not isinstance(reference, list) or not reference:
            raise InvalidReference(
                f"tool_call reference must be a non-empty list {layout}, got {reference!r:.80}"
            )
        for i, call in enumerate(reference):
            if not isinstance(call, dict) or len(call) != 1:
                raise InvalidReference(f"tool_call reference call #{i} must be a one-key object {layout}")
            ((name, params),) = call.items()
            if not isinstance(name, str) or not name:
                raise InvalidReference(
                    f"tool_call reference call #{i}: the function name must be a non-empty string"
                )
            if not isinstance(params, dict):
                raise InvalidReference(
                    f"tool_call reference call #{i} ({name}): arguments must be an object {layout}"
                )
            for arg, options in params.items():
                if not isinstance(options, list) or not options:
                    raise InvalidReference(
                        f"tool_call reference {name}.{arg}: acceptable values must be a non-empty list, got {options!r:.60}"
                    )

    def grade(self, response: str, reference: Any) -> GradeResult:
        self.check_reference(reference)
        try:
            calls = parse_calls(response)
        except ValueError as exc:
            return GradeResult(False, f"could not parse tool calls: {exc}")
        if len(calls) != len(reference):
            return GradeResult(False, f"expected {len(reference)} call(s), got {len(calls)}")
        if len(reference) == 1:
            reason = check_call(calls[0], reference[0])
            return GradeResult(False, reason) if reason else GradeResult(True)
        matched: set[int] = set()
        for i, expected in enumerate(reference):
            reasons = []
            for j, call in enumerate(calls):
                if j in matched:
                    continue
                reason = check_call(call, expected)
                if reason is None:
                    matched.add(j)
                    break
                reasons.append((call[0] == next(iter(expected)), f"{_describe(call)}: {reason}"))
            else:
                same_name = [r for same, r in reasons if same] or [r for _, r in reasons]
                return GradeResult(
                    False,
                    f"no call matches expected call #{i} ({next(iter(expected))}); closest: {same_name[0]}",
                )
        return GradeResult(True)
