"""SPIFFE IDs as margo-stream uses them.

A tenant is a SPIFFE trust domain; a device is ``spiffe://<tenant>/margo/client/<device-id>``,
carried as the single URI SAN of its X.509-SVID. Parsing is strict on purpose: anything the
SPIFFE ID specification forbids (ports, userinfo, query, fragment, empty or dot segments,
upper-case trust domains, percent-encoding) is refused with an error that says which rule broke.

One deliberate widening: path segments may contain ``~``, because Margo device ids are
``[A-Za-z0-9._~-]+`` and a device id must round-trip through its SPIFFE ID.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime

from margo_stream.errors import IdentityError

SCHEME = "spiffe"
MAX_ID_LENGTH = 2048
MAX_TRUST_DOMAIN_LENGTH = 255
DEVICE_PATH_PREFIX = ("margo", "client")

_TRUST_DOMAIN_RE = re.compile(r"[a-z0-9._-]+")
_SEGMENT_RE = re.compile(r"[A-Za-z0-9._~-]+")
_DEVICE_ID_RE = _SEGMENT_RE


@dataclass(frozen=True, slots=True)
class SpiffeId:
    """A parsed SPIFFE ID. ``path`` is ``""`` or starts with ``/`` (``/margo/client/press-01``)."""

    trust_domain: str
    path: str = ""

    def __str__(self) -> str:
        return f"{SCHEME}://{self.trust_domain}{self.path}"

    @property
    def segments(self) -> tuple[str, ...]:
        return tuple(self.path.split("/")[1:]) if self.path else ()


@dataclass(frozen=True, slots=True)
class DeviceIdentity:
    """Who a verified peer is. Tenant and device id come only from the verified certificate."""

    tenant: str
    device_id: str
    spiffe_id: str
    not_after: datetime
    fingerprint: str  # sha256 hex of the leaf certificate's DER
    key_sha256: str = ""  # sha256 hex of the leaf's SubjectPublicKeyInfo DER (the allow-list's pin)


def _show(text: str, limit: int = 80) -> str:
    """``repr`` of a possibly hostile string, cut short so messages stay one short line."""
    return repr(text) if len(text) <= limit else repr(text[:limit]) + "..."


def validate_trust_domain(name: str, *, what: str = "trust domain") -> str:
    """Return ``name`` if it is a valid SPIFFE trust domain, else raise IdentityError."""
    if not isinstance(name, str) or not name:
        raise IdentityError(f"{what} is empty")
    if len(name) > MAX_TRUST_DOMAIN_LENGTH:
        raise IdentityError(
            f"{what} {name[:40]!r}... is longer than {MAX_TRUST_DOMAIN_LENGTH} characters"
        )
    if not _TRUST_DOMAIN_RE.fullmatch(name):
        raise IdentityError(
            f"{what} {_show(name)} may contain only lowercase letters, digits, '.', '-' and '_'"
        )
    return name


def validate_tenant(name: str) -> str:
    """A tenant name is a trust domain."""
    return validate_trust_domain(name, what="tenant name")


def validate_device_id(device_id: str) -> str:
    """Return ``device_id`` if it matches ``[A-Za-z0-9._~-]+`` (and is not ``.`` or ``..``)."""
    if not isinstance(device_id, str) or not device_id:
        raise IdentityError("device id is empty")
    if not _DEVICE_ID_RE.fullmatch(device_id):
        raise IdentityError(
            f"device id {_show(device_id)} may contain only letters, digits, '.', '_', '~' and '-'"
        )
    if device_id in (".", ".."):
        raise IdentityError(f"device id {device_id!r} is a dot segment, not a name")
    return device_id


def device_spiffe_id(tenant: str, device_id: str) -> str:
    """``spiffe://<tenant>/margo/client/<device-id>``, both parts validated."""
    validate_tenant(tenant)
    validate_device_id(device_id)
    return f"{SCHEME}://{tenant}/{'/'.join(DEVICE_PATH_PREFIX)}/{device_id}"


def parse_spiffe_id(uri: str) -> SpiffeId:
    """Parse ``uri`` strictly as a SPIFFE ID; IdentityError names what is wrong."""
    if not isinstance(uri, str):
        raise IdentityError(f"SPIFFE ID must be a string, not {type(uri).__name__}")
    if not uri:
        raise IdentityError("SPIFFE ID is empty")
    if len(uri.encode("utf-8", "surrogatepass")) > MAX_ID_LENGTH:
        raise IdentityError(f"SPIFFE ID is longer than {MAX_ID_LENGTH} bytes")
    scheme, sep, rest = uri.partition("://")
    if not sep:
        raise IdentityError(f"{_show(uri)} is not a SPIFFE ID: no 'spiffe://' scheme")
    if scheme != SCHEME:
        raise IdentityError(
            f"{_show(uri)} is not a SPIFFE ID: scheme must be 'spiffe', not {scheme!r}"
        )
    if "?" in rest:
        raise IdentityError(f"{_show(uri)} is not a SPIFFE ID: a query is not allowed")
    if "#" in rest:
        raise IdentityError(f"{_show(uri)} is not a SPIFFE ID: a fragment is not allowed")
    authority, slash, path_rest = rest.partition("/")
    if "@" in authority:
        raise IdentityError(f"{_show(uri)} is not a SPIFFE ID: userinfo is not allowed")
    if ":" in authority:
        raise IdentityError(f"{_show(uri)} is not a SPIFFE ID: a port is not allowed")
    if not authority:
        raise IdentityError(f"{_show(uri)} is not a SPIFFE ID: the trust domain is missing")
    try:
        validate_trust_domain(authority)
    except IdentityError as exc:
        raise IdentityError(f"{_show(uri)} is not a SPIFFE ID: {exc}") from None
    path = ""
    if slash:
        for segment in path_rest.split("/"):
            if not segment:
                raise IdentityError(
                    f"{_show(uri)} is not a SPIFFE ID: the path has an empty segment "
                    "(double or trailing '/')"
                )
            if segment in (".", ".."):
                raise IdentityError(
                    f"{_show(uri)} is not a SPIFFE ID: dot segment {segment!r} in path"
                )
            if not _SEGMENT_RE.fullmatch(segment):
                raise IdentityError(
                    f"{_show(uri)} is not a SPIFFE ID: path segment {_show(segment, 40)} may contain only "
                    "letters, digits, '.', '_', '~' and '-'"
                )
        path = "/" + path_rest
    return SpiffeId(authority, path)


def device_id_from_spiffe(spiffe: SpiffeId) -> str:
    """The device id in ``/margo/client/<id>``, or IdentityError if the path is anything else."""
    segments = spiffe.segments
    if len(segments) != 3 or segments[:2] != DEVICE_PATH_PREFIX:
        raise IdentityError(
            f"SPIFFE ID '{spiffe}' is not a device id (path must be /margo/client/<id>)"
        )
    try:
        return validate_device_id(segments[2])
    except IdentityError as exc:
        raise IdentityError(f"SPIFFE ID '{spiffe}' is not a device id: {exc}") from None


def parse_device_spiffe_id(uri: str) -> tuple[str, str]:
    """``(tenant, device_id)`` from a device SPIFFE ID; IdentityError otherwise."""
    spiffe = parse_spiffe_id(uri)
    return spiffe.trust_domain, device_id_from_spiffe(spiffe)
