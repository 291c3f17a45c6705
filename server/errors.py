"""Domain errors raised by the service layer and mapped to HTTP statuses by ``server.app``.

Each message starts with the field or check it concerns (``"expected_revision: ..."``), so clients and the
malicious-input tests can see which part of the request was refused.
"""

from __future__ import annotations


class RegistryError(Exception):
    status_code = 400

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class NotFound(RegistryError):
    status_code = 404


class Conflict(RegistryError):
    """State changed or forbids the action (stale revision, retired version, failed gate): 409."""

    status_code = 409


class Forbidden(RegistryError):
    status_code = 403


class Invalid(RegistryError):
    """Well-formed request with unacceptable content (artifact outside the roots, tampered files): 422."""

    status_code = 422
