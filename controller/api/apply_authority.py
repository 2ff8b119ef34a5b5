"""Who authored an apply: the operator signatures that come with the documents.

``margoctl apply`` signs each document (the digest of its exact bytes) with the operator's key
and sends, beside the documents, ``signatures`` (document digest -> signature envelope) and
``certificate`` (the operator's certificate envelope). The controller checks them against the
tenant's newest root metadata before it stores anything, so a mistake is a clear 4xx at once;
the devices check them again against the root they pinned, which is what makes a controller
that skipped this check harmless.
"""

from __future__ import annotations

import datetime as dt
import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from controller.problems import Problem
from margo_stream.errors import MargoError
from margo_stream.identity.authored import verify_signed_by
from margo_stream.identity.authority import (
    Operator,
    Role,
    RootMetadata,
    read_root,
    verify_operator,
)
from margo_stream.identity.envelope import SignatureMemo, canonical
from margo_stream.state.digest import sha256_digest
from margo_stream.state.documents import Deployment


@dataclass(frozen=True, slots=True)
class ApplyAuthority:
    certificate: bytes  # canonical bytes, stored as a blob and pushed like the files
    certificate_digest: str
    operator: str
    signatures: Mapping[str, dict[str, Any]]  # document digest -> signature envelope


@dataclass(frozen=True, slots=True)
class OperatorClaim:
    """The operator certificate of an apply, verified; the signatures not yet."""

    certificate: dict[str, Any]
    signatures: Mapping[str, Any]
    root: RootMetadata  # the tenant's newest
    verified: Operator  # what the certificate says, checked against ``root`` (a deployer)

    @property
    def operator(self) -> str:
        return self.verified.name


# every apply carries its operator's certificate: its root signature is checked once
_CERTIFICATES = SignatureMemo()


@functools.lru_cache(maxsize=64)
def _current_root(data: bytes) -> RootMetadata:
    """The tenant's newest root metadata, parsed once per version (it is immutable)."""
    return read_root(data)


def check_operator(
    body: Mapping[str, Any], root_chain: Sequence[bytes], now: dt.datetime
) -> OperatorClaim:
    """The apply's operator certificate, verified against the tenant's root (a deployer); a 422
    problem if it is missing or refused. Cheap, so it runs before any document is parsed:
    only a certified deployer makes the controller read YAML."""
    cert = body.get("certificate")
    sigs = body.get("signatures")
    if not isinstance(cert, dict) or not isinstance(sigs, dict):
        raise Problem(
            422,
            "documents must be signed by an operator: give 'signatures' (document digest -> "
            "signature) and the operator's 'certificate' (margoctl apply does this with "
            "--operator DIR or a token file with its key beside it)",
            kind="unsigned-document",
        )
    root = _current_root(root_chain[-1])
    try:
        operator = verify_operator(cert, root, now, role=Role.DEPLOYER, memo=_CERTIFICATES)
    except MargoError as exc:
        raise Problem(
            422, f"operator certificate refused: {exc}", kind="invalid-signature"
        ) from None
    return OperatorClaim(cert, sigs, root, operator)


def check_signatures(
    claim: OperatorClaim, docs: Sequence[tuple[bytes, Deployment]], now: dt.datetime
) -> ApplyAuthority:
    """The apply's authority: every document signed by the claim's operator; a 422 problem
    naming the first document that is not."""
    checked: dict[str, dict[str, Any]] = {}
    for i, (data, dep) in enumerate(docs):
        digest = sha256_digest(data)
        sig = claim.signatures.get(digest)
        what = f"document {i} (deployment {dep.deployment_id!r}, {digest})"
        if not isinstance(sig, dict):
            raise Problem(422, f"{what} is not signed", kind="unsigned-document")
        try:
            # the certificate was checked once for the request (check_operator)
            verify_signed_by(
                sig,
                claim.verified,
                claim.root.tenant,
                deployment_id=dep.deployment_id,
                digest=digest,
                now=now,
            )
        except MargoError as exc:
            raise Problem(422, f"{what}: {exc}", kind="invalid-signature") from None
        checked[digest] = sig
    cert_bytes = canonical(claim.certificate)
    return ApplyAuthority(cert_bytes, sha256_digest(cert_bytes), claim.operator, checked)


def check_authority(
    body: Mapping[str, Any],
    docs: Sequence[tuple[bytes, Deployment]],
    root_chain: Sequence[bytes],
    now: dt.datetime,
) -> ApplyAuthority:
    """The apply's authority, verified: every document signed by one deployer whom the
    tenant's root certified; a 422 problem naming the first document that is not."""
    return check_signatures(check_operator(body, root_chain, now), docs, now)
