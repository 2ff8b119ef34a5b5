"""What a device has trusted so far, persisted: the pinned root key, the newest root metadata,
the newest manifest it accepted, and the newest operator signature per deployment.

JSON, replaced atomically. Format 2; a format-1 file (from before roots: it pinned the
controller's signing key) is read as format 2 with no root metadata and no signatures held, and
is re-pinned to the root key the identity directory holds now.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from margo_stream.errors import TrustError
from margo_stream.identity.authority import format_time, parse_time
from margo_stream.protocol.codes import Refusal
from margo_stream.state.digest import is_digest

STATE_FORMAT = 2
MAX_HELD_SIGNATURES = 10_000  # deployment ids remembered, removed ones included


@dataclass(frozen=True, slots=True)
class HeldSignature:
    """The newest operator signature accepted for a deployment id."""

    digest: str
    signed_at: dt.datetime


@dataclass(frozen=True, slots=True)
class TrustState:
    tenant: str
    device_id: str
    key_fingerprint: str  # of the pinned root key
    manifest_version: int | None = None
    manifest_digest: str | None = None
    root: Mapping[str, Any] | None = None  # newest trusted root metadata envelope
    signatures: Mapping[str, HeldSignature] = field(default_factory=dict)

    def to_json(self) -> bytes:
        held = sorted(self.signatures.items(), key=lambda kv: kv[1].signed_at)[
            -MAX_HELD_SIGNATURES:
        ]
        return (
            json.dumps(
                {
                    "format": STATE_FORMAT,
                    "tenant": self.tenant,
                    "deviceId": self.device_id,
                    "keyFingerprint": self.key_fingerprint,
                    "manifestVersion": self.manifest_version,
                    "manifestDigest": self.manifest_digest,
                    "root": self.root,
                    "signatures": {
                        k: {"digest": v.digest, "signedAt": format_time(v.signed_at, precise=True)}
                        for k, v in held
                    },
                },
                sort_keys=True,
                separators=(",", ":"),  # compact: the C encoder (indent= takes the Python one)
            ).encode()
            + b"\n"
        )

    @classmethod
    def from_json(cls, data: bytes, path: Path, *, pinned: str) -> TrustState:
        def corrupt(why: str) -> TrustError:
            return TrustError(
                f"trust state {path} is unreadable ({why}); re-enrol the device",
                Refusal.STATE_CORRUPT,
            )

        try:
            raw: Any = json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise corrupt(f"not JSON: {exc}") from None
        if not isinstance(raw, dict) or raw.get("format") not in (1, STATE_FORMAT):
            raise corrupt("unknown format")
        version, digest = raw.get("manifestVersion"), raw.get("manifestDigest")
        if not all(isinstance(raw.get(k), str) for k in ("tenant", "deviceId", "keyFingerprint")):
            raise corrupt("tenant, deviceId and keyFingerprint must be strings")
        if (version is None) != (digest is None):
            raise corrupt("manifestVersion and manifestDigest must both be set or both null")
        if version is not None and (
            isinstance(version, bool)
            or not isinstance(version, int)
            or version < 1
            or not is_digest(digest)
        ):
            raise corrupt("bad manifestVersion or manifestDigest")
        if raw["format"] == 1:  # before roots: re-pin to the root key
            return cls(raw["tenant"], raw["deviceId"], pinned, version, digest)
        root = raw.get("root")
        if root is not None and not isinstance(root, dict):
            raise corrupt("root must be an object or null")
        signatures: dict[str, HeldSignature] = {}
        raw_sigs = raw.get("signatures") or {}
        if not isinstance(raw_sigs, dict):
            raise corrupt("signatures must be an object")
        for dep, held in raw_sigs.items():
            if not isinstance(held, dict) or not is_digest(held.get("digest")):
                raise corrupt(f"bad held signature of {str(dep)[:60]!r}")
            try:
                signed_at = parse_time(held.get("signedAt"), "signedAt")
            except TrustError:
                raise corrupt(f"bad signedAt of {str(dep)[:60]!r}") from None
            signatures[str(dep)] = HeldSignature(held["digest"], signed_at)
        return cls(
            raw["tenant"], raw["deviceId"], raw["keyFingerprint"], version, digest, root, signatures
        )
