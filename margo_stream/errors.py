"""Exception types shared by every part of margo-stream.

Every error a person can meet says what was wrong and, where it helps, what to do. Protocol
errors follow h11's model: one ``ProtocolError`` base with a wire ``code``, a
``LocalProtocolError`` when *we* were asked to do something the protocol forbids and a
``RemoteProtocolError`` when the peer sent something invalid.

One error-code convention: an error's ``code`` is always an ``ErrorCode``, the number that goes
on the wire (QUIC CONNECTION_CLOSE, RESET_STREAM, our ``error`` messages). Where one code
covers several reasons a machine must tell apart, the error also carries a string enum naming
the reason (``TrustError.refusal``: a ``Refusal``), which is what documents and
``desired_result`` messages carry.
"""

from __future__ import annotations

from margo_stream.protocol.codes import ErrorCode, Refusal


class MargoError(Exception):
    """Base of every margo-stream error."""


class ConfigError(MargoError):
    """Invalid configuration, command-line flags or input files."""


class IdentityError(MargoError):
    """A certificate, key or SPIFFE ID is unreadable, invalid or not trusted."""


class PeerRejected(IdentityError):
    """The peer's certificate was refused; ``reason`` is logged and sent to the peer."""

    def __init__(self, reason: str, *, code: ErrorCode = ErrorCode.IDENTITY_REFUSED) -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code


class ProtocolError(MargoError):
    """A violation of the margo-stream wire protocol. ``code`` is the application error code."""

    def __init__(self, message: str, code: ErrorCode) -> None:
        super().__init__(message)
        self.code = code


class LocalProtocolError(ProtocolError):
    """We tried to do something the protocol does not allow in the current state."""


class RemoteProtocolError(ProtocolError):
    """The peer sent bytes or a message that the protocol does not allow."""


class StoreError(MargoError):
    """The controller's store failed (disk full, corrupt database, ...)."""


class NotFound(MargoError):
    """A resource does not exist (or belongs to another tenant, which looks the same)."""


class DocumentError(MargoError):
    """A Margo document (deployment YAML, manifest) is invalid; the message names the field."""


class TrustError(MargoError):
    """Signed desired state was refused (bad signature, expired, rollback, digest mismatch);
    ``refusal`` says which."""

    code = ErrorCode.DESIRED_REFUSED

    def __init__(self, message: str, refusal: Refusal, *, deployment_id: str | None = None) -> None:
        super().__init__(message)
        self.refusal = refusal
        self.deployment_id = deployment_id  # the deployment refused, when it is one


class AuthorityError(TrustError):
    """A document's authority did not check out against the tenant's root of trust (root
    metadata, an operator certificate, an operator's signature or terminal grant)."""


class TelemetryBufferError(MargoError):
    """The telemetry buffer refused or could not store a record."""
