"""Numbers that appear on the wire: ALPN, application error codes, stream kinds, senders."""

from __future__ import annotations

import enum

ALPN = "margo-stream/1"
PROTOCOL_VERSION = 1

# The hard ceiling on one frame's payload; a peer that announces more is cut off.
DEFAULT_MAX_FRAME = 1 << 20


class ErrorCode(enum.IntEnum):
    """Application error codes carried in QUIC CONNECTION_CLOSE, RESET_STREAM and STOP_SENDING,
    and in our own ``error`` messages."""

    NO_ERROR = 0x0
    PROTOCOL_ERROR = 0x100
    FRAME_TOO_LARGE = 0x101
    MALFORMED_FRAME = 0x102
    INVALID_MESSAGE = 0x103
    UNEXPECTED_MESSAGE = 0x104
    UNKNOWN_STREAM_KIND = 0x105
    WRONG_STREAM_OPENER = 0x106
    TRUNCATED_STREAM = 0x107
    STREAM_LIMIT = 0x108  # too many failed streams on one connection (closes the connection)
    BUFFER_LIMIT = 0x109  # more buffered, unparsed bytes across streams than the budget
    IDENTITY_REFUSED = 0x200
    IDENTITY_MISMATCH = 0x201
    REPLACED = 0x202
    SHUTTING_DOWN = 0x203
    HELLO_TIMEOUT = 0x204
    DESIRED_REFUSED = 0x300
    TERMINAL_REFUSED = 0x301
    CANCELLED = 0x302
    STATUS_REFUSED = 0x303  # status for a deployment not assigned, or a version never issued
    LOGS_NOT_FOUND = 0x304  # a logs request names a deployment or component the device lacks
    LOGS_REFUSED = 0x305  # a logs request the device will not serve now (too many at once)
    INTERNAL_ERROR = 0x3FF

    @classmethod
    def describe(cls, code: int) -> str:
        try:
            return cls(code).name.lower().replace("_", "-")
        except ValueError:
            return f"unknown-error-{code:#x}"


class Refusal(enum.StrEnum):
    """Why a device refused signed desired state: ``TrustError.refusal`` and the ``code`` of a
    ``desired_result`` (a kind within ``ErrorCode.DESIRED_REFUSED``)."""

    BAD_SIGNATURE = "bad-signature"
    EXPIRED = "expired"
    ROLLBACK = "rollback"
    VERSION_REUSE = "version-reuse"
    WRONG_DEVICE = "wrong-device"
    WRONG_TENANT = "wrong-tenant"
    DIGEST_MISMATCH = "digest-mismatch"
    MISSING_BLOB = "missing-blob"
    MALFORMED = "malformed"
    KEY_CHANGED = "key-changed"
    STATE_CORRUPT = "state-corrupt"  # the device's own trust-state file is unreadable
    INVALID_DOCUMENT = "invalid-document"  # signed, but a document the agent cannot run
    TOO_LARGE = "too-large"  # more bytes than the agent holds for one push
    STORE_FAILED = "store-failed"  # verified and running, but not stored durably
    UNSIGNED = "unsigned"  # a deployment no operator signed
    ROLE_MISSING = "role-missing"  # signed by an operator without the role it needs
    STALE = "stale"  # an operator's older signature where a newer one was accepted
    REPLAYED = "replayed"  # a terminal grant's nonce was used before
    ROOT_ROLLBACK = "root-rollback"  # root metadata older than the one held


class StreamKind(enum.StrEnum):
    CONTROL = "control"
    DESIRED = "desired"
    STATUS = "status"
    TELEMETRY = "telemetry"
    TERMINAL = "terminal"
    LOGS = "logs"


class Sender(enum.StrEnum):
    AGENT = "agent"
    CONTROLLER = "controller"

    @property
    def peer(self) -> Sender:
        return Sender.CONTROLLER if self is Sender.AGENT else Sender.AGENT
