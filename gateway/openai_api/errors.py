"""OpenAI's error shape, ``{"error": {"message", "type", "param", "code"}}``, and its status codes.

Every refusal of the OpenAI-compatible API is an :class:`APIError`; clients (the official SDK
among them) read ``type`` and ``code`` to decide whether to retry, and show ``message``.
"""

from __future__ import annotations

from gateway.openai_api.responses import Answer
from gateway.outcomes import JobError

INVALID_REQUEST = "invalid_request_error"
AUTHENTICATION = "authentication_error"
PERMISSION = "permission_error"
NOT_FOUND = "not_found_error"
RATE_LIMIT = "rate_limit_error"
SERVER = "server_error"
TIMEOUT = "timeout_error"


class APIError(Exception):
    """A request refused or failed, answered in OpenAI's error shape with ``status``."""

    def __init__(self, status: int, message: str, *, type: str = INVALID_REQUEST, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, dict[str, str | None]]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self, headers: dict[str, str] | None = None) -> Answer:
        return Answer(self.body(), self.status, headers=headers)


def invalid(param: str | None, message: str, code: str | None = None) -> APIError:
    """400: the request itself is wrong; ``param`` names the field."""
    return APIError(400, message, param=param, code=code)


def from_job_error(error: JobError) -> APIError:
    """A failed run (every route target failed, a plugin refused the task, a deadline) as the client sees it.

    Providers' rejections of the request (400, 413, 422: too long, filtered) stay the client's
    fault; a refusal by a ``prepare_task`` hook is a 400 (or its own 4xx code); the rest is the
    gateway's upstream failing: 502/503/504, which clients retry."""
    code = error.code if isinstance(error.code, int) else 500
    if error.reason == "refused":
        status = code if 400 <= code < 500 else 400
        return APIError(status, error.message, code="refused")
    if code in (400, 413, 415, 422):
        return APIError(400, error.message, code="context_length_exceeded" if code == 413 else "provider_rejected")
    if code == 404:
        return APIError(404, error.message, type=NOT_FOUND, param="model", code="model_not_found")
    if code == 504:
        return APIError(504, error.message, type=TIMEOUT, code="timeout")
    if code in (502, 503):
        return APIError(code, error.message, type=SERVER, code="upstream_failed")
    return APIError(500, error.message, type=SERVER, code="internal_error")
