"""Verify a device's client certificate after the TLS handshake.

aioquic checks the client's CertificateVerify signature but never its chain, so the controller
calls :meth:`PeerVerifier.verify` on the leaf and chain the peer sent, before it accepts a
single stream. Theory of operation:

1. The leaf must carry exactly one URI SAN, and it must be a SPIFFE ID of the form
   ``spiffe://<tenant>/margo/client/<device-id>``.
2. The tenant is taken ONLY from that URI's trust domain. The chain is verified against that
   tenant's bundle and no other, so a leaf signed by globex's CA that claims
   ``spiffe://acme/...`` is refused: acme's bundle does not verify it.
3. Validity time and the clientAuth EKU are checked here as well as by ``cryptography``'s
   verifier, so the refusal reason is specific (``cryptography`` accepts a leaf with no EKU).
4. Successful results are cached (bounded LRU keyed by sha256 of the leaf and chain DER);
   a hit still re-checks the validity window of the whole verified chain against ``now``.

``cryptography``'s verifier fixes its validation time when it is built, so each tenant's
``Store`` is built once (at construction or :meth:`PeerVerifier.reload`) and a verifier is
built per call from it with ``time(now)``; that costs about a microsecond.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from margo_stream.errors import IdentityError, PeerRejected
from margo_stream.identity.allowed_files import spki_sha256
from margo_stream.identity.spiffe import DeviceIdentity, device_id_from_spiffe, parse_spiffe_id

DEFAULT_CACHE_SIZE = 4096

_DER = serialization.Encoding.DER


def _ts(when: datetime) -> str:
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


@dataclass(frozen=True, slots=True)
class _Cached:
    identity: DeviceIdentity
    leaf_not_before: datetime
    leaf_not_after: datetime
    chain_not_before: datetime  # latest not_before over the verified chain (leaf included)
    chain_not_after: datetime  # earliest not_after over the verified chain


@dataclass(frozen=True, slots=True)
class _State:
    """Everything a reload swaps at once (one attribute assignment, safe across threads)."""

    stores: Mapping[str, Store]
    cache: OrderedDict[bytes, _Cached]


class PeerVerifier:
    """Decides which device (and tenant) a client certificate proves, or refuses it."""

    def __init__(
        self,
        bundles: Mapping[str, Sequence[x509.Certificate]],
        *,
        cache_size: int = DEFAULT_CACHE_SIZE,
        certs_dir: Path | None = None,
    ) -> None:
        if cache_size < 0:
            raise ValueError("cache_size must be >= 0")
        self._cache_size = cache_size
        self._certs_dir = Path(certs_dir) if certs_dir is not None else None
        self._lock = threading.Lock()
        self._state = self._build(bundles)
        self.hits = 0
        self.misses = 0

    @classmethod
    def from_dir(cls, certs_dir: Path, *, cache_size: int = DEFAULT_CACHE_SIZE) -> PeerVerifier:
        """Load every ``DIR/<tenant>/ca.pem``; :meth:`reload` re-reads the same directory."""
        from margo_stream.identity.trust import load_trust_bundles

        return cls(load_trust_bundles(certs_dir), cache_size=cache_size, certs_dir=certs_dir)

    @staticmethod
    def _build(bundles: Mapping[str, Sequence[x509.Certificate]]) -> _State:
        stores: dict[str, Store] = {}
        for tenant, cas in bundles.items():
            if not cas:
                raise IdentityError(f"trust bundle for tenant {tenant!r} is empty")
            stores[tenant] = Store(list(cas))
        return _State(stores, OrderedDict())

    @property
    def tenants(self) -> list[str]:
        return sorted(self._state.stores)

    def reload(self, bundles: Mapping[str, Sequence[x509.Certificate]] | None = None) -> None:
        """Replace the trust bundles (re-read ``certs_dir`` when none are given); clears the cache.

        On error the old bundles stay in force.
        """
        if bundles is None:
            if self._certs_dir is None:
                raise IdentityError("reload() needs bundles: this verifier was not built from_dir")
            from margo_stream.identity.trust import load_trust_bundles

            bundles = load_trust_bundles(self._certs_dir)
        self._state = self._build(bundles)

    # ------------------------------------------------------------------ verification

    def verify(
        self,
        leaf: x509.Certificate | None,
        chain: Sequence[x509.Certificate] = (),
        now: datetime | None = None,
    ) -> DeviceIdentity:
        """The verified device identity, or ``PeerRejected`` with a one-line reason."""
        if leaf is None:
            raise PeerRejected("no client certificate")
        now = datetime.now(UTC) if now is None else now.astimezone(UTC)
        state = self._state
        leaf_der = leaf.public_bytes(_DER)
        chain_ders = [c.public_bytes(_DER) for c in chain]
        key = _cache_key(leaf_der, chain_ders)
        with self._lock:
            entry = state.cache.get(key)
            if entry is not None:
                state.cache.move_to_end(key)
        if entry is not None:
            if entry.chain_not_before <= now <= entry.chain_not_after:
                self.hits += 1
                return entry.identity
            with self._lock:
                state.cache.pop(key, None)
        self.misses += 1
        entry = self._verify_uncached(state, leaf, leaf_der, list(chain), now)
        if self._cache_size:
            with self._lock:
                state.cache[key] = entry
                while len(state.cache) > self._cache_size:
                    state.cache.popitem(last=False)
        return entry.identity

    def readmit(self, identity: DeviceIdentity, now: datetime | None = None) -> None:
        """``PeerRejected`` once the certificate ``identity`` came from has expired (a
        connection kept alive must not outlive it)."""
        now = datetime.now(UTC) if now is None else now.astimezone(UTC)
        if now > identity.not_after:
            raise PeerRejected(f"certificate expired at {_ts(identity.not_after)}")

    def _verify_uncached(
        self,
        state: _State,
        leaf: x509.Certificate,
        leaf_der: bytes,
        chain: list[x509.Certificate],
        now: datetime,
    ) -> _Cached:
        uris = _uri_sans(leaf)
        if len(uris) != 1:
            raise PeerRejected(
                f"certificate has {len(uris)} URI SANs; exactly one SPIFFE ID is required"
            )
        try:
            spiffe = parse_spiffe_id(uris[0])
        except IdentityError as exc:
            text = str(exc)
            raise PeerRejected(
                f"URI SAN {text}"
                if "is not a SPIFFE ID" in text
                else f"URI SAN is not a SPIFFE ID: {text}"
            ) from None
        tenant = spiffe.trust_domain
        store = state.stores.get(tenant)
        if store is None:
            raise PeerRejected(f"unknown trust domain {tenant!r}")
        not_before, not_after = leaf.not_valid_before_utc, leaf.not_valid_after_utc
        if now > not_after:
            raise PeerRejected(f"certificate expired at {_ts(not_after)}")
        if now < not_before:
            raise PeerRejected(f"certificate not yet valid (valid from {_ts(not_before)})")
        if not _has_client_auth(leaf):
            raise PeerRejected("certificate is missing the clientAuth extended key usage")
        try:
            device_id = device_id_from_spiffe(spiffe)
        except IdentityError as exc:
            raise PeerRejected(str(exc)) from None
        verifier = PolicyBuilder().store(store).time(now).build_client_verifier()
        try:
            verified = verifier.verify(leaf, chain)
        except VerificationError as exc:
            raise PeerRejected(
                f"certificate chain does not verify against the {tenant!r} trust bundle: "
                f"{_short_reason(exc)}"
            ) from None
        identity = DeviceIdentity(
            tenant=tenant,
            device_id=device_id,
            spiffe_id=str(spiffe),
            not_after=not_after,
            fingerprint=hashlib.sha256(leaf_der).hexdigest(),
            key_sha256=spki_sha256(leaf),
        )
        path = [leaf, *verified.chain[1:]] if verified.chain else [leaf]
        return _Cached(
            identity,
            not_before,
            not_after,
            max(c.not_valid_before_utc for c in path),
            min(c.not_valid_after_utc for c in path),
        )

    def cache_len(self) -> int:
        return len(self._state.cache)


def _cache_key(leaf_der: bytes, chain_ders: Sequence[bytes]) -> bytes:
    h = hashlib.sha256()
    for der in (leaf_der, *chain_ders):
        h.update(len(der).to_bytes(4, "big"))
        h.update(der)
    return h.digest()


def _uri_sans(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return san.get_values_for_type(x509.UniformResourceIdentifier)


def _has_client_auth(cert: x509.Certificate) -> bool:
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return False
    return ExtendedKeyUsageOID.CLIENT_AUTH in eku


def _short_reason(exc: VerificationError) -> str:
    """cryptography's reason without the certificate repr it appends."""
    text = _one_line(exc)
    cut = text.find(" (encountered processing")
    return text[:cut] if cut > 0 else text


__all__ = ["DEFAULT_CACHE_SIZE", "PeerVerifier"]
