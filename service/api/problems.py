"""The problem+json answers each route declares in OpenAPI, so clients (and schemathesis) know every status."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

PROBLEM_JSON = "application/problem+json"
_PROBLEM_REF = {"$ref": "#/components/schemas/Problem"}

_DESCRIPTIONS = {
    400: "malformed request: a body that cannot be parsed, an invalid cursor",
    401: "no valid API key (code unauthenticated)",
    403: "the key may not do this (code admin_only: the route needs an admin key)",
    404: "no such resource, or it belongs to another tenant",
    405: "method not allowed; Allow lists the allowed ones",
    409: "the job's state does not allow this",
    413: "the body exceeds its size limit",
    415: "the body has an unsupported content type",
    422: "invalid input: the spec, model, dataset or a parameter (see code)",
    429: "rate_limited (see Retry-After) or quota_exceeded",
    500: "an unexpected error",
    503: "database_unavailable or storage_unavailable: a passing state (see Retry-After); the request did not commit",
}
HEADERS = {
    401: {"WWW-Authenticate": {"schema": {"type": "string"}, "description": "Bearer"}},
    429: {"Retry-After": {"schema": {"type": "string"}, "description": "Seconds until the key may call again"}},
    503: {"Retry-After": {"schema": {"type": "string"}, "description": "Seconds until a retry is worth it"}},
}


class Problem(BaseModel):
    """RFC 9457 problem details. Extra members carry the specifics (the plan, a dataset's line, ...)."""

    model_config = ConfigDict(extra="allow")
    type: str
    title: str
    status: int
    detail: str
    code: str = Field(description="Stable and machine-readable, e.g. does_not_fit, unauthenticated")
    instance: str | None = None


def problems(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` entries for these statuses, each a problem+json body."""
    return {
        status: {
            "description": _DESCRIPTIONS[status],
            "content": {PROBLEM_JSON: {"schema": _PROBLEM_REF}},
            **({"headers": HEADERS[status]} if status in HEADERS else {}),
        }
        for status in statuses
    }


# Every authenticated route: an unparsable request, a missing or bad key, an invalid parameter, the rate limit,
# the unexpected, a lost database connection or unreachable storage.
AUTHENTICATED = problems(400, 401, 422, 429, 500, 503)
