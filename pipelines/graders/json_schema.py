"""``json_schema`` (structured data repair): the response's JSON must validate against a schema (and equal a value).

Reference: ``{"schema": <JSON Schema>, "expected": <JSON value, optional>}`` (or its JSON text).

* The response's JSON is the last fenced ```json block, else the whole response, else the last top-level JSON
  object or array in the text (:func:`pipelines.graders.json_values.extract_json`). ``NaN``/``Infinity`` are not
  JSON.
* It must validate against ``schema`` with the `jsonschema` validator of the schema's ``$schema`` draft (latest
  draft when absent), with **format checking on** (``"format": "date"``, ``"email"``, ... are asserted, for the
  formats jsonschema checks without optional packages).
* When ``expected`` is given it must also equal it by JSON's rules (:func:`~pipelines.graders.json_values.json_equal`:
  key order irrelevant, ``1`` == ``1.0``, ``true`` != ``1``).

``check_reference`` rejects a schema the validator's ``check_schema`` refuses, unknown keys, and an ``expected``
that does not itself validate against the schema.
"""

from __future__ import annotations

from importlib import metadata
from typing import Any

from pipelines.graders.base import Grader, GradeResult, InvalidReference
from pipelines.graders.json_values import extract_json, json_equal

__all__ = ["JsonSchemaGrader"]

_KEYS = {"schema", "expected"}


def _path(error: Any) -> str:
    """``$.a[0].b``: where in the response's JSON a ``jsonschema.ValidationError`` points."""
    return "$" + "".join(f"[{p!r}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path)


class JsonSchemaGrader(Grader):
    name = "json_schema"
    version = f"1+jsonschema{metadata.version('jsonschema')}"
    structured = True

    def _validator(self, reference: Any) -> Any:
        from jsonschema.exceptions import SchemaError  # imported here: jsonschema costs ~0.3 s at start-up
        from jsonschema.validators import validator_for

        if not isinstance(reference, dict) or "schema" not in reference:
            raise InvalidReference(
                'json_schema reference must be an object {"schema": <JSON Schema>, "expected": <optional>}, '
                f"got {type(reference).__name__}"
            )
        unknown = sorted(set(reference) - _KEYS)
        if unknown:
            raise InvalidReference(
                f"json_schema reference has unknown keys {unknown} (allowed: schema, expected)"
            )
        schema = reference["schema"]
        if not isinstance(schema, dict | bool):
            raise InvalidReference(
                f"json_schema 'schema' must be an object or a boolean, got {type(schema).__name__}"
            )
        cls = validator_for(schema)
        try:
            cls.check_schema(schema)
        except SchemaError as exc:
            where = "/".join(str(p) for p in exc.absolute_path) or "(root)"
            raise InvalidReference(
                f"json_schema 'schema' is not a valid JSON Schema at {where}: {exc.message}"
            ) from None
        return cls(schema, format_checker=cls.FORMAT_CHECKER)

    def check_reference(self, reference: Any) -> None:
        from jsonschema.exceptions import best_match

        validator = self._validator(reference)
        if "expected" in reference:
            error = best_match(validator.iter_errors(reference["expected"]))
            if error is not None:
                raise InvalidReference(
                    f"json_schema 'expected' does not validate against its own schema at {_path(error)}: {error.message}"
                )

    def grade(self, response: str, reference: Any) -> GradeResult:
        from jsonschema.exceptions import best_match

        validator = self._validator(reference)
        try:
            value, source = extract_json(response)
        except ValueError as exc:
            return GradeResult(False, f"no JSON to grade: {exc}")
        error = best_match(validator.iter_errors(value))
        if error is not None:
            return GradeResult(
                False, f"JSON from {source} fails the schema at {_path(error)}: {error.message}"
            )
        if "expected" in reference and not json_equal(value, reference["expected"]):
            return GradeResult(False, f"JSON from {source} validates but differs from the expected value")
        return GradeResult(True)
