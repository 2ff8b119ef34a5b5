"""RFC 9457 problem details: the one error type of every HTTP API the controller serves.

Code raises :class:`Problem` wherever it finds the error; the server that catches it renders
it with its API's :class:`ProblemDialect`:

- :data:`OPERATOR_PROBLEMS`: the operator API (``controller.api``). Types are
  ``urn:margo-stream:problem:<kind>``; the document holds ``type``, ``title``, ``status`` and
  ``detail``.
- :data:`DEVICE_PROBLEMS`: the device-facing HTTP APIs (``controller.device_api``). A problem
  whose kind Margo rc.3 registers (:data:`MARGO_PROBLEM_TITLES`: invalid-request,
  semantic-error, not-authorized, gateway-not-found, device-not-found, invalid-bundle,
  deployment-not-found, server-cannot-generate-response) has Margo's type
  ``https://docs.margo.org/specification/problem-types#<kind>`` and Margo's title; plain HTTP
  conditions no Margo or project type describes (:data:`BLANK_KINDS`: no such route, method
  not allowed, an internal error) are ``about:blank`` with the status phrase; the project's own conditions
  (status-refused, content-too-large, no-desired-state, store-unavailable, ...) keep
  ``https://margo-stream.dev/problems#<kind>``. The document also holds ``retryable`` (true
  for 5xx), and ``instance`` and ``errors`` when given; it is encoded as canonical JSON.

Both are served as ``application/problem+json``. :meth:`Problem.render` gives the status,
headers and body bytes for a server that builds its own responses (``device_api.rest_poll``);
the operator API wraps :meth:`Problem.body` in a Starlette response
(``controller.api.routes_common.problem_response``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

from margo_stream.state.manifest import canonical_json

PROBLEM_MEDIA_TYPE = "application/problem+json"


# Margo's problem-type namespace (workload-management-api-1.0.0-rc.3.yaml, ProblemDetail:
# "The https://docs.margo.org/specification/problem-types namespace is reserved for Margo")
MARGO_PROBLEM_NAMESPACE = "https://docs.margo.org/specification/problem-types"
# the kinds Margo registers (problem-types.md) and the titles it gives them
MARGO_PROBLEM_TITLES: Mapping[str, str] = {
    "invalid-request": "Invalid Request",
    "semantic-error": "Semantic Error",
    "not-authorized": "Not Authorized",
    "gateway-not-found": "Gateway not found",
    "device-not-found": "Device Not Found",
    "invalid-bundle": "Invalid Bundle",
    "deployment-not-found": "Deployment Not Found",
    "server-cannot-generate-response": "Server Cannot Generate Response",
}
BLANK_KINDS = frozenset({"not-found", "method-not-allowed", "internal"})
BLANK = "about:blank"


@dataclass(frozen=True, slots=True)
class ProblemDialect:
    """How one API spells its problem documents."""

    type_prefix: str  # the document's ``type`` is this followed by the problem's kind
    retryable: bool  # add the ``retryable`` member (true for 5xx)
    canonical: bool  # encode as canonical JSON (sorted keys) rather than in member order
    # kinds with a registered type and title of their own: kind -> (type URI, title)
    registered: Mapping[str, tuple[str, str]] = field(default_factory=dict)
    blank: frozenset[str] = frozenset()  # kinds rendered as ``about:blank``

    def type_and_title(self, kind: str, title: str) -> tuple[str, str]:
        """The ``type`` and ``title`` of a problem of ``kind`` (``title`` as raised)."""
        if kind in self.registered:
            return self.registered[kind]
        if kind in self.blank:
            return BLANK, title
        return self.type_prefix + kind, title


OPERATOR_PROBLEMS = ProblemDialect("urn:margo-stream:problem:", retryable=False, canonical=False)
DEVICE_PROBLEMS = ProblemDialect(
    "https://margo-stream.dev/problems#",
    retryable=True,
    canonical=True,
    registered={k: (f"{MARGO_PROBLEM_NAMESPACE}#{k}", t) for k, t in MARGO_PROBLEM_TITLES.items()},
    blank=BLANK_KINDS,
)


@dataclass(frozen=True, slots=True)
class RenderedProblem:
    """A problem ready to send: status, headers (content type first) and body bytes."""

    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


class Problem(Exception):
    """An RFC 9457 problem detail; raise it to answer with one.

    ``status`` is the HTTP status code. ``title`` defaults to the status's reason phrase and
    ``kind`` (the last part of the problem's type) to that phrase in kebab case. ``errors``
    lists per-field messages (``{"field", "message"}``); ``headers`` are sent with the
    response (``Allow``, ``WWW-Authenticate`` ...)."""

    def __init__(
        self,
        status: int,
        detail: str,
        *,
        kind: str | None = None,
        title: str | None = None,
        errors: list[dict[str, str]] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        phrase = _phrase(status)
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.title = title or phrase
        self.kind = kind or phrase.lower().replace(" ", "-").replace("'", "")
        self.errors = errors
        self.headers: dict[str, str] = dict(headers or {})

    def __str__(self) -> str:
        return f"{self.status} {self.title}: {self.detail}"

    def document(self, dialect: ProblemDialect, instance: str | None = None) -> dict[str, Any]:
        """The problem details object as ``dialect`` spells it."""
        type_, title = dialect.type_and_title(self.kind, self.title)
        doc: dict[str, Any] = {
            "type": type_,
            "title": title,
            "status": self.status,
            "detail": self.detail,
        }
        if dialect.retryable:
            doc["retryable"] = self.status >= 500
        if instance:
            doc["instance"] = instance
        if self.errors:
            doc["errors"] = self.errors
        return doc

    def body(self, dialect: ProblemDialect, instance: str | None = None) -> bytes:
        doc = self.document(dialect, instance)
        if dialect.canonical:
            return canonical_json(doc)
        return json.dumps(doc, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode(
            "utf-8"
        )

    def render(self, dialect: ProblemDialect, instance: str | None = None) -> RenderedProblem:
        """Status, headers and body of the response that answers with this problem."""
        headers = (("content-type", PROBLEM_MEDIA_TYPE), *self.headers.items())
        return RenderedProblem(self.status, headers, self.body(dialect, instance))


__all__ = [
    "BLANK",
    "BLANK_KINDS",
    "DEVICE_PROBLEMS",
    "MARGO_PROBLEM_NAMESPACE",
    "MARGO_PROBLEM_TITLES",
    "OPERATOR_PROBLEMS",
    "PROBLEM_MEDIA_TYPE",
    "Problem",
    "ProblemDialect",
    "RenderedProblem",
]
