"""Margo rc.3's deployment bundle: one ``application/vnd.margo.bundle.v1+tar+gzip`` archive of
a manifest's ApplicationDeployment documents.

rc.3 (``DeploymentBundleRef``): a gzip-compressed tar whose root holds exactly the YAML files
the manifest's ``deployments`` reference, its digest over the archive's exact bytes, served
at ``/api/v1/bundles/{digest}``; ``bundle`` is ``null`` when there are no deployments (an
empty archive is never served).

The archive is deterministic so that its digest is stable for the same documents: members
``<deploymentId>.yaml`` in deployment id order, each the document's exact bytes, ustar
headers with mtime 0, mode 0644, uid/gid 0 and empty owner names; gzip with mtime 0, no file
name and compression level 9. (zlib's output is stable for one zlib build; the digest is
computed over the bytes served, so a client verifies what it got either way.)
"""

from __future__ import annotations

import gzip
import io
import tarfile
from collections.abc import Iterable

from margo_stream.state.content_rules import valid_id

BUNDLE_MEDIA_TYPE = "application/vnd.margo.bundle.v1+tar+gzip"


def bundle_url(digest: str) -> str:
    return f"/api/v1/bundles/{digest}"


def build_bundle(documents: Iterable[tuple[str, bytes]]) -> bytes:
    """The archive of ``(deployment_id, exact document bytes)`` pairs; ``ValueError`` for
    none, a duplicate or an id that is not a safe file name."""
    docs = sorted(documents)
    if not docs:
        raise ValueError("a bundle holds at least one deployment (rc.3: bundle is null otherwise)")
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        seen: set[str] = set()
        for deployment_id, data in docs:
            if not valid_id(deployment_id) or deployment_id in seen:
                raise ValueError(f"bad or duplicate deployment id {deployment_id[:80]!r}")
            seen.add(deployment_id)
            info = tarfile.TarInfo(f"{deployment_id}.yaml")
            info.size = len(data)
            info.mtime = 0
            info.mode = 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.type = tarfile.REGTYPE
            tar.addfile(info, io.BytesIO(data))
    out = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", compresslevel=9, fileobj=out, mtime=0) as gz:
        gz.write(raw.getvalue())
    return out.getvalue()


def read_bundle(data: bytes, *, max_bytes: int = 64 << 20) -> dict[str, bytes]:
    """``{file name: bytes}`` of a bundle (for clients and tests); ``ValueError`` when it is
    not a flat archive of regular files or unpacks past ``max_bytes``."""
    out: dict[str, bytes] = {}
    total = 0
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
            for member in tar:
                if not member.isreg() or "/" in member.name or member.name.startswith("."):
                    raise ValueError(f"unexpected bundle member {member.name[:80]!r}")
                total += member.size
                if total > max_bytes:
                    raise ValueError(f"bundle unpacks past {max_bytes} bytes")
                f = tar.extractfile(member)
                assert f is not None
                out[member.name] = f.read()
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise ValueError(f"not a tar+gzip bundle: {exc}") from None
    return out


__all__ = ["BUNDLE_MEDIA_TYPE", "build_bundle", "bundle_url", "read_bundle"]
