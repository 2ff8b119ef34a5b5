"""Every message of the wire protocol, validated by pydantic at the boundary.

A message is a msgpack map whose ``t`` names its type. ``parse_message`` turns a decoded map
into a model (raising ``RemoteProtocolError(INVALID_MESSAGE)`` naming the bad field) and
``to_wire`` turns a model back into a map. Capabilities follow Margo's device-capabilities
document (rc.3 field names).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    TypeAdapter,
    ValidationError,
    model_serializer,
)

from margo_stream.errors import RemoteProtocolError
from margo_stream.protocol.codes import ErrorCode

DEVICE_ID_PATTERN = r"^[A-Za-z0-9._~-]+$"
DIGEST_PATTERN = r"^sha256:[0-9a-f]{64}$"
U64 = Annotated[int, Field(ge=0, le=2**64 - 1)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --- Margo device capabilities (device-capabilities.md, rc.3) --------------------------------
class Cpu(_Model):
    cores: int = Field(ge=1)
    architecture: str


class TypedItem(_Model):
    type: str


class Capabilities(_Model):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)
    id: str
    vendor: str | None = None
    modelNumber: str | None = None
    serialNumber: str | None = None
    cpus: list[Cpu] = []
    memory: str | None = None
    storage: str | None = None
    peripherals: list[TypedItem] = []
    interfaces: list[TypedItem] = []
    otelCollector: bool | None = None
    supportedRuntimes: list[str] = []
    supportedDeploymentTypes: list[str] = []
    labels: dict[str, str] = {}


# --- control stream ----------------------------------------------------------------------------
# The hello's ``proto`` from which an agent reads the refusal members of a ``status_ack``.
# Agents before it say 1 (nothing checks the number otherwise), so they never get them.
PROTO_STATUS_REFUSALS = 2
# ... and from which it takes compressed frames (margo_stream.protocol.frames): the controller
# compresses what it sends on that connection once the hello is in.
PROTO_COMPRESSED_FRAMES = 3
# ... and from which its compressed frames may refer back to their stream's earlier frames
# (frames.SharedWindow)
PROTO_SHARED_WINDOW = 4


class Hello(_Model):
    t: Literal["hello"] = "hello"
    proto: int = PROTO_SHARED_WINDOW
    device_id: str = Field(pattern=DEVICE_ID_PATTERN, max_length=200)
    agent_version: str = Field(max_length=64)
    capabilities: Capabilities
    manifest_version: U64 | None = None
    manifest_digest: str | None = Field(default=None, pattern=DIGEST_PATTERN)
    blobs: list[Annotated[str, Field(pattern=DIGEST_PATTERN)]] = Field(default=[], max_length=4096)
    telemetry_next_seq: U64 = 1
    root_version: U64 | None = None  # newest root metadata version the agent trusts


class HelloAck(_Model):
    t: Literal["hello_ack"] = "hello_ack"
    tenant: str
    device_id: str
    server_time: float
    keepalive_s: float
    telemetry_acked: U64 = 0
    # the tenant's root metadata versions newer than the hello's root_version (oldest first)
    root: list[Annotated[bytes, Field(max_length=64 * 1024)]] = Field(default=[], max_length=64)


class Ping(_Model):
    t: Literal["ping"] = "ping"
    n: U64


class Pong(_Model):
    t: Literal["pong"] = "pong"
    n: U64


class Stats(_Model):
    """Agent -> controller: counters the controller shows per device (buffer fill, drops)."""

    t: Literal["stats"] = "stats"
    values: dict[str, int | float | str | None]


class Error(_Model):
    t: Literal["error"] = "error"
    code: int
    reason: str = Field(max_length=1024)


# --- desired state (controller-opened) ----------------------------------------------------------
class Desired(_Model):
    t: Literal["desired"] = "desired"
    version: U64
    manifest: bytes
    signature: bytes
    blobs: list[Annotated[str, Field(pattern=DIGEST_PATTERN)]] = Field(default=[], max_length=4096)
    # the tenant's root metadata versions newer than the agent's (canonical JSON, oldest first)
    root: list[Annotated[bytes, Field(max_length=64 * 1024)]] = Field(default=[], max_length=64)


class Blob(_Model):
    t: Literal["blob"] = "blob"
    digest: str = Field(pattern=DIGEST_PATTERN)
    data: bytes
    more: bool = False


class DesiredResult(_Model):
    t: Literal["desired_result"] = "desired_result"
    version: U64
    ok: bool
    unchanged: bool = False
    code: str | None = None
    reason: str | None = Field(default=None, max_length=1024)


# --- status events (agent-opened) ---------------------------------------------------------------
class StatusErrorModel(_Model):
    code: str
    source: str
    message: str


class ComponentStatusModel(_Model):
    name: str
    state: Literal["pending", "installing", "installed", "failed", "removing", "removed"]
    error: StatusErrorModel | None = None


class Status(_Model):
    t: Literal["status"] = "status"
    seq: U64
    deployment_id: str
    manifest_version: U64
    state: Literal["pending", "installing", "installed", "failed", "removing", "removed"]
    components: list[ComponentStatusModel] = []
    error: StatusErrorModel | None = None


class StatusAck(_Model):
    """The status ``seq`` was handled: stored, or (``code`` ``STATUS_REFUSED`` and a
    ``reason``) refused because it claims what the device was never issued. Either way the
    agent does not send it again. The refusal members are sent only to agents whose hello says
    ``proto`` >= ``PROTO_STATUS_REFUSALS`` and are left off the wire when unset, so a plain
    ack is the same map as before and older agents, which parse strictly, never see them."""

    t: Literal["status_ack"] = "status_ack"
    seq: U64
    code: int | None = None
    reason: str | None = Field(default=None, max_length=1024)

    @model_serializer(mode="wrap")
    def _omit_unset(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        for key in ("code", "reason"):
            if data.get(key) is None:
                data.pop(key, None)
        return data


# --- telemetry (agent-opened) -------------------------------------------------------------------
class Telemetry(_Model):
    """A batch of buffered records ``first..last`` (``count`` of them, ascending, gaps allowed
    where the agent lost records): ``data`` is the msgpack list of ``[seq, stream, payload]``,
    compressed as ``codec`` says. ``oldest`` is the agent's oldest retained record: anything
    the controller lacks below it was dropped on the device and becomes a gap, not a wait."""

    t: Literal["telemetry"] = "telemetry"
    oldest: U64
    first: U64
    last: U64
    count: int = Field(ge=1, le=65536)
    codec: Literal["none", "zlib"] = "zlib"
    data: bytes


class TelemetryAck(_Model):
    t: Literal["telemetry_ack"] = "telemetry_ack"
    seq: U64


# --- terminal (controller-opened) ---------------------------------------------------------------
class TermOpen(_Model):
    t: Literal["term_open"] = "term_open"
    session_id: str = Field(max_length=64)
    command: list[str] | None = None
    rows: int = Field(default=24, ge=1, le=1000)
    cols: int = Field(default=80, ge=1, le=1000)
    tty: bool = True
    # the operator's signed grant for this session and the operator's certificate (canonical
    # JSON); the device opens nothing without them
    grant: bytes | None = Field(default=None, max_length=16 * 1024)
    certificate: bytes | None = Field(default=None, max_length=16 * 1024)


class TermOpened(_Model):
    t: Literal["term_opened"] = "term_opened"
    pid: int
    operator: str | None = Field(default=None, max_length=256)  # who the grant verified


class TermData(_Model):
    t: Literal["term_data"] = "term_data"
    data: bytes
    fd: Literal[0, 1, 2] = 1


class TermEof(_Model):
    """Operator -> device: no more input (non-interactive exec)."""

    t: Literal["term_eof"] = "term_eof"


class TermResize(_Model):
    t: Literal["term_resize"] = "term_resize"
    rows: int = Field(ge=1, le=1000)
    cols: int = Field(ge=1, le=1000)


class TermExit(_Model):
    t: Literal["term_exit"] = "term_exit"
    status: int
    reason: str | None = None


class TermClose(_Model):
    t: Literal["term_close"] = "term_close"
    reason: str | None = None


class TermAck(_Model):
    """Flow control, either way: ``consumed`` is the total of ``term_data`` bytes the sender
    has passed on so far (to the operator, or into the device's process). A side keeps at
    most a fixed window of bytes unacknowledged, so a fast producer meets backpressure
    instead of growing buffers; interactive traffic never comes near the window."""

    t: Literal["term_ack"] = "term_ack"
    consumed: U64


# --- workload logs (controller-opened) ----------------------------------------------------------
NAME_PATTERN = r"^[A-Za-z0-9_~-][A-Za-z0-9._~-]{0,199}$"  # a deployment id or component name
LOGS_MAX_TAIL = 10_000  # lines of each component's log a request may ask for
LOGS_MAX_LINE = 16 * 1024  # characters of one line; longer ones are cut
LOGS_MAX_BATCH = 512  # lines in one logs_lines message


class LogsOpen(_Model):
    """Controller -> agent: send the last ``tail`` lines of the deployment's component (every
    component when None), then, with ``follow``, each new line until the log ends or the
    controller ends its side of the stream."""

    t: Literal["logs_open"] = "logs_open"
    deployment_id: str = Field(pattern=NAME_PATTERN)
    component: str | None = Field(default=None, pattern=NAME_PATTERN)
    tail: int = Field(default=100, ge=0, le=LOGS_MAX_TAIL)
    follow: bool = False


class LogsOpened(_Model):
    """Agent -> controller: the components whose lines follow (sorted)."""

    t: Literal["logs_opened"] = "logs_opened"
    components: list[Annotated[str, Field(pattern=NAME_PATTERN)]] = Field(max_length=256)


class LogsLines(_Model):
    t: Literal["logs_lines"] = "logs_lines"
    component: str = Field(pattern=NAME_PATTERN)
    lines: list[Annotated[str, Field(max_length=LOGS_MAX_LINE)]] = Field(
        min_length=1, max_length=LOGS_MAX_BATCH
    )


class LogsAck(_Model):
    """Controller -> agent: ``consumed`` is the running total of line bytes (UTF-8, one byte
    per line for its end) passed on to the operator; the agent keeps a window unacked."""

    t: Literal["logs_ack"] = "logs_ack"
    consumed: U64


class LogsEnd(_Model):
    """Agent -> controller: nothing more (``complete``: the tail was sent and no follow was
    asked; ``ended``: the component stopped or was removed)."""

    t: Literal["logs_end"] = "logs_end"
    reason: str = Field(max_length=1024)


Message = Annotated[
    Hello
    | HelloAck
    | Ping
    | Pong
    | Stats
    | Error
    | Desired
    | Blob
    | DesiredResult
    | Status
    | StatusAck
    | Telemetry
    | TelemetryAck
    | TermOpen
    | TermOpened
    | TermData
    | TermEof
    | TermResize
    | TermExit
    | TermClose
    | TermAck
    | LogsOpen
    | LogsOpened
    | LogsLines
    | LogsAck
    | LogsEnd,
    Field(discriminator="t"),
]
_ADAPTER: TypeAdapter[Any] = TypeAdapter(Message)
MESSAGE_TYPES: frozenset[str] = frozenset(
    m.model_fields["t"].default
    for m in (
        Hello,
        HelloAck,
        Ping,
        Pong,
        Stats,
        Error,
        Desired,
        Blob,
        DesiredResult,
        Status,
        StatusAck,
        Telemetry,
        TelemetryAck,
        TermOpen,
        TermOpened,
        TermData,
        TermEof,
        TermResize,
        TermExit,
        TermClose,
        TermAck,
        LogsOpen,
        LogsOpened,
        LogsLines,
        LogsAck,
        LogsEnd,
    )
)


def parse_message(raw: dict[str, Any]) -> Any:
    """Validate a decoded map; ``RemoteProtocolError`` names the first bad field."""
    try:
        return _ADAPTER.validate_python(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "message"
        raise RemoteProtocolError(
            f"invalid {raw.get('t')!r} message: {where}: {first['msg']}",
            ErrorCode.INVALID_MESSAGE,
        ) from None


def to_wire(message: BaseModel) -> dict[str, Any]:
    return message.model_dump(mode="python", exclude_none=False)
