"""Constrained identifier types shared by the request schemas and the policy schema.

Names are matched against an allowlist regex so that path-traversal, URL-encoded, SQL and control-character
payloads never reach the database, MLflow or the file system (reliability.md §7 S-API3).
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, StringConstraints

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
Name = Annotated[str, StringConstraints(pattern=NAME_PATTERN, max_length=128), Field(strict=True)]
SuiteName = Annotated[str, StringConstraints(pattern=NAME_PATTERN, max_length=128)]
VersionNumber = Annotated[int, Field(strict=True, ge=1, le=2**31 - 1)]
Reason = Annotated[str, StringConstraints(min_length=3, max_length=2000, pattern=r"^[^\x00]*$")]
MLFLOW_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,255}$"
MlflowId = Annotated[str, StringConstraints(pattern=MLFLOW_ID_PATTERN, max_length=256), Field(strict=True)]
"""An MLflow run id or logged-model id: no ``/``, no leading ``.``, no control characters (it ends up in URLs)."""
PRINTABLE_PATTERN = r"^[^\x00-\x1f\x7f]*$"
"""No NUL or other control characters (terminal escapes, newlines that forge log lines)."""
