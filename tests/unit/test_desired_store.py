"""The agent's durable desired-state store: content-addressed blobs and an atomic current.json."""

from __future__ import annotations

import contextlib
import datetime as dt
import resource
import signal
from collections import ChainMap
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.desired_store import (
    BlobMissing,
    CorruptBlobError,
    DesiredStore,
    DesiredStoreError,
    StoreFullError,
)
from margo_stream.errors import TrustError
from margo_stream.state.digest import sha256_digest
from margo_stream.state.documents import FileRef
from margo_stream.state.manifest import ManifestEntry, build_manifest, sign
from margo_stream.state.trust import DesiredStateVerifier
from tests.authority_kit import Kit, KitVerifier

T0 = dt.datetime(2025, 3, 1, tzinfo=dt.UTC)
CONTROLLER_KEY = Ed25519PrivateKey.generate()
KIT = Kit("plant-a.example", CONTROLLER_KEY)


def kit_verifier(path: Path) -> KitVerifier:
    inner = DesiredStateVerifier("plant-a.example", "edge-07", KIT.root_key.public_key(), path)
    return KitVerifier(KIT, inner)


def signed(
    key: Ed25519PrivateKey,
    version: int,
    docs: dict[str, bytes],
    files: dict[str, bytes] | None = None,
) -> tuple[bytes, bytes, dict[str, bytes]]:
    files = files or {}
    ents = [
        KIT.sign(
            ManifestEntry(
                deployment_id=i,
                digest=sha256_digest(d),
                files=tuple(FileRef(name=n, digest=sha256_digest(b)) for n, b in files.items()),
            )
        )
        for i, d in docs.items()
    ]
    data = build_manifest(
        "plant-a.example",
        "edge-07",
        version,
        ents,
        issued_at=T0,
        expires=T0 + dt.timedelta(days=30),
    )
    blobs = KIT.blobs({sha256_digest(b): b for b in [*docs.values(), *files.values()]})
    return data, sign(data, key), blobs


@pytest.fixture
def key() -> Ed25519PrivateKey:
    """The controller's online key, named by the kit's root metadata."""
    return CONTROLLER_KEY


@pytest.fixture
def store(tmp_path: Path) -> DesiredStore:
    return DesiredStore(tmp_path / "state")


def test_blob_round_trip(store: DesiredStore) -> None:
    d = sha256_digest(b"hello")
    assert not store.has_blob(d) and store.held_digests() == set()
    store.put_blob(d, b"hello")
    store.put_blob(d, b"hello")  # idempotent
    assert store.has_blob(d) and store.held_digests() == {d}
    assert store.get_blob(d) == b"hello"
    assert store.blob_path(d).name == d[7:]
    view = store.blobs()
    assert d in view and view[d] == b"hello" and list(view) == [d] and len(view) == 1
    assert "sha256:nope" not in view
    with pytest.raises(BlobMissing, match="no stored blob"):
        store.get_blob(sha256_digest(b"other"))
    with pytest.raises(KeyError):
        view[sha256_digest(b"other")]


def test_put_blob_verifies_digest_first(store: DesiredStore) -> None:
    with pytest.raises(TrustError) as info:
        store.put_blob(sha256_digest(b"a"), b"b")
    assert info.value.refusal == "digest-mismatch"
    assert store.held_digests() == set()
    assert list(store.blob_dir.iterdir()) == []


def test_corrupt_blob_is_detected_and_repaired(store: DesiredStore) -> None:
    d = sha256_digest(b"payload")
    store.put_blob(d, b"payload")
    path = store.blob_path(d)
    path.write_bytes(b"paylOad")  # bit rot
    with pytest.raises(CorruptBlobError) as info:
        store.get_blob(d)
    assert str(path) in str(info.value) and info.value.path == path
    store.put_blob(d, b"payload")  # a fresh copy replaces the corrupt one
    assert store.get_blob(d) == b"payload"


def test_current_replaced_atomically_after_blobs(
    store: DesiredStore, key: Ed25519PrivateKey
) -> None:
    assert store.load_current() is None
    m1, s1, b1 = signed(key, 1, {"a": b"doc a v1"}, {"f.txt": b"file"})
    with pytest.raises(DesiredStoreError, match="not stored yet"):
        store.save_current(m1, s1)  # blobs first, always
    assert store.load_current() is None
    store.install(b1, m1, s1)
    assert store.load_current() == (m1, s1)
    m2, s2, b2 = signed(key, 2, {"a": b"doc a v2", "b": b"doc b"})
    store.install(b2, m2, s2)
    assert store.load_current() == (m2, s2)
    assert not [p for p in store.root.iterdir() if p.name.startswith(".")]  # no temp files left
    # a fresh store object (as after a restart) sees the same state
    again = DesiredStore(store.root.parent)
    assert again.load_current() == (m2, s2)
    assert again.held_digests() == set(b1) | set(b2)


def test_gc_keeps_current_and_requested(store: DesiredStore, key: Ed25519PrivateKey) -> None:
    m1, s1, b1 = signed(key, 1, {"a": b"one"})
    store.install(b1, m1, s1)
    m2, s2, b2 = signed(key, 2, {"a": b"two"})
    store.install(b2, m2, s2)
    extra = sha256_digest(b"keep me")
    store.put_blob(extra, b"keep me")
    (store.blob_dir / ".stale.tmp-1").write_bytes(b"torn")
    removed = store.gc({extra})
    assert removed == set(b1) - set(b2)  # the operator certificate is in both
    assert store.held_digests() == set(b2) | {extra}
    assert not (store.blob_dir / ".stale.tmp-1").exists()
    assert store.gc(set()) == {extra}  # the current manifest's blobs are always kept
    assert store.held_digests() == set(b2)


def test_corrupt_current_json(store: DesiredStore, key: Ed25519PrivateKey) -> None:
    m1, s1, b1 = signed(key, 1, {"a": b"one"})
    store.install(b1, m1, s1)
    text = store.current_path.read_text()
    store.current_path.write_text(
        text.replace('"manifestDigest": "sha256:', '"manifestDigest": "sha256:0')
    )
    with pytest.raises(DesiredStoreError, match="current.json is corrupt"):
        store.load_current()
    store.current_path.write_text("{")
    with pytest.raises(DesiredStoreError, match="current.json is corrupt"):
        store.load_current()


def test_save_refuses_malformed_manifest(store: DesiredStore) -> None:
    with pytest.raises(DesiredStoreError, match="malformed"):
        store.save_current(b"{}", b"sig")


@contextlib.contextmanager
def file_size_limit(limit: int) -> Iterator[None]:
    """A real EFBIG from the kernel: cap the size of files this process may write."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


def test_disk_full_keeps_previous_current(store: DesiredStore, key: Ed25519PrivateKey) -> None:
    m1, s1, b1 = signed(key, 1, {"a": b"small"})
    store.install(b1, m1, s1)
    before = store.current_path.read_bytes()
    big_doc = b"x" * 4096
    m2, s2, b2 = signed(key, 2, {"a": b"small", "b": b"y" * 10, "c" * 150: b"z"})
    with file_size_limit(len(before) + 16):
        with pytest.raises(StoreFullError, match="disk full") as info:
            store.put_blob(sha256_digest(big_doc), big_doc)
        assert "previous desired state is kept" in str(info.value)
        for digest, data in b2.items():
            store.put_blob(digest, data)  # small blobs still fit
        with pytest.raises(StoreFullError):
            store.save_current(m2, s2)  # the larger current.json does not
    assert store.current_path.read_bytes() == before
    assert store.load_current() == (m1, s1)
    assert not store.has_blob(sha256_digest(big_doc))
    assert not [p for p in store.root.rglob(".*")]
    store.save_current(m2, s2)  # space is back
    assert store.load_current() == (m2, s2)


def test_verify_store_accept_flow(
    store: DesiredStore, key: Ed25519PrivateKey, tmp_path: Path
) -> None:
    """The agent's order: verify (received + held blobs), store, reconcile, then accept."""
    verifier = kit_verifier(tmp_path / "trust.json")
    now = T0 + dt.timedelta(hours=1)
    m1, s1, b1 = signed(key, 1, {"a": b"doc a", "b": b"doc b"})
    v1 = verifier.verify(m1, s1, ChainMap(b1, store.blobs()), now)
    store.install(b1, m1, s1)
    verifier.accept(v1)
    # version 2 changes only "b": the controller sends just the blob the agent lacks
    m2, s2, b2 = signed(key, 2, {"a": b"doc a", "b": b"doc b v2"})
    lacking = {d: b for d, b in b2.items() if not store.has_blob(d)}
    assert len(lacking) == 1
    v2 = verifier.verify(m2, s2, ChainMap(lacking, store.blobs()), now)
    store.install(lacking, m2, s2)
    # crash before accept: trust has not advanced, the same push verifies again
    restarted = kit_verifier(tmp_path / "trust.json")
    assert restarted.held_version == 1
    assert not restarted.verify(m2, s2, store.blobs(), now).unchanged
    verifier.accept(v2)
    assert kit_verifier(tmp_path / "trust.json").held_version == 2
