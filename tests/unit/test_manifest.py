"""Signed desired-state manifests and the agent's TUF-style verifier, with real Ed25519 keys."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from margo_stream.errors import DocumentError, TrustError
from margo_stream.state.digest import sha256_digest
from margo_stream.state.documents import FileRef
from margo_stream.state.manifest import (
    MEDIA_TYPE,
    ManifestEntry,
    blob_digests,
    build_manifest,
    canonical_json,
    margo_manifest,
    parse_manifest,
    sign,
)
from margo_stream.state.trust import DesiredStateVerifier, key_fingerprint
from tests.authority_kit import Kit, KitVerifier

TENANT = "plant-a.example"
DEVICE = "edge-07"
T0 = dt.datetime(2025, 3, 1, 12, 0, 0, tzinfo=dt.UTC)
NOW = T0 + dt.timedelta(minutes=5)
EXAMPLE = (Path(__file__).resolve().parents[2] / "examples" / "process-heartbeat.yaml").read_bytes()
CONFIG = b"interval = 5\n"
CONTROLLER_KEY = Ed25519PrivateKey.generate()
KIT = Kit(TENANT, CONTROLLER_KEY)
ROOT_PUB = KIT.root_key.public_key()


def entries(doc: bytes = EXAMPLE) -> tuple[list[ManifestEntry], dict[str, bytes]]:
    blobs = {sha256_digest(doc): doc, sha256_digest(CONFIG): CONFIG}
    entry = ManifestEntry(
        deployment_id="heartbeat-0001",
        digest=sha256_digest(doc),
        files=(FileRef(name="conf/hb.toml", digest=sha256_digest(CONFIG)),),
    )
    return [KIT.sign(entry)], KIT.blobs(blobs)


def manifest(
    version: int,
    doc: bytes = EXAMPLE,
    *,
    tenant: str = TENANT,
    device: str = DEVICE,
    expires: dt.datetime | None = None,
) -> tuple[bytes, dict[str, bytes]]:
    ents, blobs = entries(doc)
    data = build_manifest(
        tenant, device, version, ents, issued_at=T0, expires=expires or T0 + dt.timedelta(days=7)
    )
    return data, blobs


@pytest.fixture
def key() -> Ed25519PrivateKey:
    """The controller's online key, which the kit's root metadata names."""
    return CONTROLLER_KEY


@pytest.fixture
def verifier(tmp_path: Path) -> KitVerifier:
    return KitVerifier(KIT, DesiredStateVerifier(TENANT, DEVICE, ROOT_PUB, tmp_path / "trust.json"))


def refused(
    verifier: KitVerifier,
    data: bytes,
    sig: bytes,
    blobs: dict[str, bytes],
    code: str,
    now: dt.datetime = NOW,
) -> str:
    with pytest.raises(TrustError) as info:
        verifier.verify(data, sig, blobs, now)
    assert info.value.refusal == code, str(info.value)
    return str(info.value)


# --------------------------------------------------------------------------- manifest


def test_canonical_bytes_are_stable_and_sorted() -> None:
    a = ManifestEntry(deployment_id="b", digest=sha256_digest(b"b"))
    b = ManifestEntry(
        deployment_id="a",
        digest=sha256_digest(b"a"),
        files=(
            FileRef(name="z", digest=sha256_digest(b"z")),
            FileRef(name="y/x", digest=sha256_digest(b"y")),
        ),
    )
    one = build_manifest(
        TENANT, DEVICE, 3, [a, b], issued_at=T0, expires=T0 + dt.timedelta(hours=1)
    )
    two = build_manifest(
        TENANT,
        DEVICE,
        3,
        [b, a],
        issued_at=T0.astimezone(dt.timezone(dt.timedelta(hours=2))),
        expires=T0 + dt.timedelta(hours=1, microseconds=7),
    )
    assert one == two
    doc = json.loads(one)
    assert one == canonical_json(doc)
    assert doc["mediaType"] == MEDIA_TYPE and doc["bundle"] is None
    assert doc["issuedAt"] == "2025-03-01T12:00:00Z" and doc["expires"] == "2025-03-01T13:00:00Z"
    assert [d["deploymentId"] for d in doc["deployments"]] == ["a", "b"]
    assert [f["name"] for f in doc["deployments"][0]["files"]] == ["y/x", "z"]
    assert doc["deployments"][1]["url"] == f"/api/v1/deployments/b/{sha256_digest(b'b')}"


def test_margo_projection_and_blob_digests() -> None:
    data, blobs = manifest(5)
    m = parse_manifest(data)
    view = margo_manifest(m)
    assert view == {
        "manifestVersion": 5,
        "bundle": None,
        "deployments": [
            {
                "deploymentId": "heartbeat-0001",
                "digest": sha256_digest(EXAMPLE),
                "url": f"/api/v1/deployments/heartbeat-0001/{sha256_digest(EXAMPLE)}",
            }
        ],
    }
    assert blob_digests(m) == set(blobs)


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda d: d.update(manifestVersion=0), r"manifestVersion 0"),
        (lambda d: d.update(manifestVersion=2**64), r"manifestVersion"),
        (lambda d: d.update(manifestVersion=True), r"manifestVersion"),
        (lambda d: d.update(manifestVersion="5"), r"manifestVersion"),
        (lambda d: d.update(mediaType="application/json"), r"mediaType"),
        (lambda d: d.update(bundle={}), r"bundle"),
        (lambda d: d.update(extra=1), r"extra"),
        (lambda d: d.pop("expires"), r"expires"),
        (lambda d: d.update(expires="2025-03-01 13:00:00"), r"RFC 3339"),
        (lambda d: d.update(expires="2025-03-01T12:00:00Z"), r"not after issuedAt"),
        (lambda d: d.update(deviceId="a b"), r"deviceId"),
        (lambda d: d.update(tenant=""), r"tenant"),
        (lambda d: d["deployments"][0].update(url="/elsewhere"), r"url"),
        (lambda d: d["deployments"][0].update(digest="sha256:abc"), r"invalid digest"),
        (lambda d: d["deployments"][0]["files"][0].update(name="../x"), r"'\.\.'"),
        (lambda d: d["deployments"].append(dict(d["deployments"][0])), r"appears twice"),
        (lambda d: d["deployments"][0].pop("files"), r"files"),
    ],
)
def test_parse_refuses_malformed(mutate, match: str) -> None:  # type: ignore[no-untyped-def]
    doc = json.loads(manifest(5)[0])
    mutate(doc)
    with pytest.raises(DocumentError, match=match):
        parse_manifest(canonical_json(doc))


@pytest.mark.parametrize(
    "data", [b"", b"[]", b"{", b"\xff", b'{"a":1,"a":2}', b'{"manifestVersion": NaN}']
)
def test_parse_refuses_non_manifests(data: bytes) -> None:
    with pytest.raises(DocumentError):
        parse_manifest(data)


def test_build_refuses_bad_input() -> None:
    ents, _ = entries()
    with pytest.raises(DocumentError, match="time zone"):
        build_manifest(TENANT, DEVICE, 1, ents, issued_at=T0.replace(tzinfo=None), expires=T0)
    with pytest.raises(DocumentError, match="after issuedAt"):
        build_manifest(TENANT, DEVICE, 1, ents, issued_at=T0, expires=T0)
    with pytest.raises(DocumentError, match="appears twice"):
        build_manifest(TENANT, DEVICE, 1, ents + ents, issued_at=T0, expires=NOW)
    with pytest.raises(DocumentError, match="deployment id"):
        build_manifest(
            TENANT,
            DEVICE,
            1,
            [ManifestEntry(deployment_id="a/b", digest=sha256_digest(b""))],
            issued_at=T0,
            expires=NOW,
        )


_ids = st.from_regex(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,20}", fullmatch=True)
_names = st.lists(st.from_regex(r"[a-z0-9_-]{1,8}", fullmatch=True), min_size=1, max_size=3).map(
    "/".join
)


@settings(max_examples=60, deadline=None)
@given(
    version=st.integers(1, 2**64 - 1),
    items=st.dictionaries(
        _ids,
        st.tuples(
            st.binary(max_size=16), st.dictionaries(_names, st.binary(max_size=8), max_size=3)
        ),
        max_size=4,
    ),
    issued=st.datetimes(
        min_value=dt.datetime(2000, 1, 1),
        max_value=dt.datetime(2200, 1, 1),
        timezones=st.just(dt.UTC),
    ),
    lifetime=st.integers(1, 10**8),
)
def test_build_parse_round_trip(
    version: int, items: dict, issued: dt.datetime, lifetime: int
) -> None:
    ents = [
        ManifestEntry(
            deployment_id=i,
            digest=sha256_digest(doc),
            files=tuple(FileRef(name=n, digest=sha256_digest(b)) for n, b in files.items()),
        )
        for i, (doc, files) in items.items()
    ]
    expires = issued + dt.timedelta(seconds=lifetime)
    data = build_manifest(TENANT, DEVICE, version, ents, issued_at=issued, expires=expires)
    m = parse_manifest(data)
    assert m.manifest_version == version and m.tenant == TENANT and m.device_id == DEVICE
    assert m.issued_at == issued.replace(microsecond=0)
    assert m.expires == expires.replace(microsecond=0)
    assert [e.deployment_id for e in m.deployments] == sorted(items)
    again = build_manifest(
        m.tenant,
        m.device_id,
        m.manifest_version,
        list(m.deployments),
        issued_at=m.issued_at,
        expires=m.expires,
    )
    assert again == data


# --------------------------------------------------------------------------- verifier


def test_accepts_and_persists_after_apply(
    key: Ed25519PrivateKey, verifier: KitVerifier, tmp_path: Path
) -> None:
    data, blobs = manifest(1)
    verdict = verifier.verify(data, sign(data, key), blobs, NOW)
    assert not verdict.unchanged and verdict.version == 1 and verdict.previous_version is None
    assert verdict.manifest_digest == sha256_digest(data)
    # verify alone persists nothing: a torn apply does not advance trust
    again = DesiredStateVerifier(TENANT, DEVICE, ROOT_PUB, tmp_path / "trust.json")
    assert again.held_version is None
    verifier.accept(verdict)
    reloaded = DesiredStateVerifier(TENANT, DEVICE, ROOT_PUB, tmp_path / "trust.json")
    assert reloaded.held_version == 1 and reloaded.held_digest == sha256_digest(data)
    assert reloaded.pinned_fingerprint == key_fingerprint(ROOT_PUB)


def test_same_version_same_bytes_is_a_no_op(key: Ed25519PrivateKey, verifier: KitVerifier) -> None:
    data, blobs = manifest(4)
    verifier.accept(verifier.verify(data, sign(data, key), blobs, NOW))
    verdict = verifier.verify(data, sign(data, key), {}, NOW)  # no blobs needed
    assert verdict.unchanged and verdict.previous_version == 4
    verifier.accept(verdict)
    assert verifier.held_version == 4


def test_bad_signature(key: Ed25519PrivateKey, verifier: KitVerifier) -> None:
    data, blobs = manifest(1)
    sig = sign(data, key)
    refused(verifier, data + b" ", sig, blobs, "bad-signature")
    refused(verifier, data, sig[:-1] + bytes([sig[-1] ^ 1]), blobs, "bad-signature")
    refused(verifier, data, sig[:10], blobs, "bad-signature")
    other = Ed25519PrivateKey.generate()
    refused(verifier, data, sign(data, other), blobs, "bad-signature")


def test_malformed_but_signed(key: Ed25519PrivateKey, verifier: KitVerifier) -> None:
    data = b'{"manifestVersion": 1}'
    msg = refused(verifier, data, sign(data, key), {}, "malformed")
    assert "malformed" in msg


def test_expired(key: Ed25519PrivateKey, verifier: KitVerifier) -> None:
    data, blobs = manifest(1, expires=T0 + dt.timedelta(minutes=1))
    msg = refused(verifier, data, sign(data, key), blobs, "expired")
    assert "expired at 2025-03-01T12:01:00" in msg
    verifier.verify(data, sign(data, key), blobs, T0 + dt.timedelta(seconds=59))


def test_rollback_and_version_reuse(key: Ed25519PrivateKey, verifier: KitVerifier) -> None:
    v5, blobs5 = manifest(5)
    verifier.accept(verifier.verify(v5, sign(v5, key), blobs5, NOW))
    v4, blobs4 = manifest(4)
    refused(verifier, v4, sign(v4, key), blobs4, "rollback")
    changed = EXAMPLE.replace(b"SID-123-ABC", b"SID-9")
    other5, blobs_other = manifest(5, changed)
    refused(verifier, other5, sign(other5, key), blobs_other, "version-reuse")
    v6, blobs6 = manifest(6, changed)
    verdict = verifier.verify(v6, sign(v6, key), blobs6, NOW)
    verifier.accept(verdict)
    assert verifier.held_version == 6
    verifier.accept(verdict)  # accepting the same verdict twice is harmless
    assert verifier.held_version == 6


def test_accept_refuses_older_verdict(key: Ed25519PrivateKey, verifier: KitVerifier) -> None:
    v2, b2 = manifest(2)
    v3, b3 = manifest(3)
    old = verifier.verify(v2, sign(v2, key), b2, NOW)
    new = verifier.verify(v3, sign(v3, key), b3, NOW)
    verifier.accept(new)
    with pytest.raises(TrustError) as info:
        verifier.accept(old)
    assert info.value.refusal == "rollback"


def test_wrong_device_and_tenant(key: Ed25519PrivateKey, verifier: KitVerifier) -> None:
    data, blobs = manifest(1, device="edge-08")
    assert "edge-08" in refused(verifier, data, sign(data, key), blobs, "wrong-device")
    data, blobs = manifest(1, tenant="plant-b.example")
    assert "plant-b.example" in refused(verifier, data, sign(data, key), blobs, "wrong-tenant")


def test_missing_and_mismatched_blobs(key: Ed25519PrivateKey, verifier: KitVerifier) -> None:
    data, blobs = manifest(1)
    sig = sign(data, key)
    doc_digest = sha256_digest(EXAMPLE)
    partial = {k: v for k, v in blobs.items() if k != doc_digest}
    assert "deployment heartbeat-0001" in refused(verifier, data, sig, partial, "missing-blob")
    tampered = dict(blobs)
    tampered[sha256_digest(CONFIG)] = b"interval = 0\n"
    msg = refused(verifier, data, sig, tampered, "digest-mismatch")
    assert "file heartbeat-0001/conf/hb.toml" in msg


def test_key_change_is_refused(
    key: Ed25519PrivateKey, verifier: KitVerifier, tmp_path: Path
) -> None:
    other = Ed25519PrivateKey.generate()
    swapped = DesiredStateVerifier(TENANT, DEVICE, other.public_key(), tmp_path / "trust.json")
    data, blobs = manifest(1)
    msg = refused(swapped, data, sign(data, other), blobs, "key-changed")
    assert key_fingerprint(ROOT_PUB) in msg


def test_state_of_another_device_or_corrupt(
    key: Ed25519PrivateKey, verifier: KitVerifier, tmp_path: Path
) -> None:
    path = tmp_path / "trust.json"
    with pytest.raises(TrustError) as info:
        DesiredStateVerifier(TENANT, "edge-99", key.public_key(), path)
    assert info.value.refusal == "wrong-device"
    with pytest.raises(TrustError) as info:
        DesiredStateVerifier("plant-z", DEVICE, key.public_key(), path)
    assert info.value.refusal == "wrong-tenant"
    path.write_bytes(b"{not json")
    with pytest.raises(TrustError) as info:
        DesiredStateVerifier(TENANT, DEVICE, key.public_key(), path)
    assert info.value.refusal == "state-corrupt"


# --------------------------------------------------------------------------- authority


def _push(entries_: list[ManifestEntry], version: int, blobs: dict[str, bytes], key=None):
    data = build_manifest(
        TENANT, DEVICE, version, entries_, issued_at=T0, expires=T0 + dt.timedelta(days=7)
    )
    return data, sign(data, key or CONTROLLER_KEY), blobs


def _entry(doc: bytes = EXAMPLE) -> tuple[ManifestEntry, dict[str, bytes]]:
    return ManifestEntry(deployment_id="heartbeat-0001", digest=sha256_digest(doc)), {
        sha256_digest(doc): doc
    }


def test_a_manifest_signed_by_a_key_the_root_does_not_name_is_refused(
    verifier: KitVerifier,
) -> None:
    data, blobs = manifest(1)
    intruder = Ed25519PrivateKey.generate()  # e.g. a controller that minted its own key
    assert "controller key" in refused(verifier, data, sign(data, intruder), blobs, "bad-signature")


def test_deployments_must_be_signed_by_a_deployer_for_these_exact_bytes(
    verifier: KitVerifier,
) -> None:
    entry, blobs = _entry()
    data, sig, blobs = _push([entry], 1, blobs)
    assert "not signed" in refused(verifier, data, sig, blobs, "unsigned")

    # a signature for another document does not cover this one
    other = KIT.sign(ManifestEntry(deployment_id="heartbeat-0001", digest=sha256_digest(b"x")))
    forged = entry.model_copy(update={"signature": other.signature, "certificate": KIT.cert_digest})
    data, sig, blobs2 = _push([forged], 1, KIT.blobs(blobs))
    refused(verifier, data, sig, blobs2, "digest-mismatch")

    # the controller's own key cannot stand in for an operator's
    from margo_stream.identity.authored import sign_deployment

    by_ctl = entry.model_copy(
        update={
            "signature": sign_deployment(
                TENANT, entry.deployment_id, entry.digest, CONTROLLER_KEY, now=T0
            ),
            "certificate": KIT.cert_digest,
        }
    )
    data, sig, blobs3 = _push([by_ctl], 1, KIT.blobs(blobs))
    refused(verifier, data, sig, blobs3, "bad-signature")

    data, sig, good = _push([KIT.sign(entry)], 1, KIT.blobs(blobs))
    verifier.accept(verifier.verify(data, sig, good, NOW))


def test_an_older_signature_of_a_deployment_is_a_replay(verifier: KitVerifier) -> None:
    new_doc = EXAMPLE + b"# v2\n"
    old, old_blobs = _entry()
    new, new_blobs = _entry(new_doc)
    data, sig, blobs = _push([KIT.sign(new, T0)], 1, KIT.blobs(new_blobs))
    verifier.accept(verifier.verify(data, sig, blobs, NOW))
    # the controller brings back the older version, with its genuine but older signature
    stale = KIT.sign(old, T0 - dt.timedelta(hours=1))
    data, sig, blobs = _push([stale], 2, KIT.blobs(old_blobs))
    assert "replay" in refused(verifier, data, sig, blobs, "stale")
    # an operator re-signing the old document now is a legitimate rollback
    data, sig, blobs = _push([KIT.sign(old, T0 + dt.timedelta(minutes=1))], 2, KIT.blobs(old_blobs))
    verifier.accept(verifier.verify(data, sig, blobs, NOW))


def test_root_rotation_arrives_with_a_push_and_rollback_is_refused(
    verifier: KitVerifier, tmp_path: Path
) -> None:
    from margo_stream.identity.authority import make_root
    from margo_stream.identity.envelope import canonical

    data, blobs = manifest(1)
    verifier.accept(verifier.verify(data, sign(data, CONTROLLER_KEY), blobs, NOW))
    assert verifier.root_version == 1
    new_ctl = Ed25519PrivateKey.generate()
    v2 = make_root(
        TENANT,
        2,
        dt.datetime(2099, 1, 1, tzinfo=dt.UTC),
        root_keys=[ROOT_PUB],
        controller_keys=[new_ctl.public_key()],
        signers=[KIT.root_key],
    )
    data, blobs = manifest(2)
    # the old controller key no longer counts once v2 is offered
    with pytest.raises(TrustError) as info:
        verifier.verify(data, sign(data, CONTROLLER_KEY), blobs, NOW, root=[canonical(v2)])
    assert info.value.refusal == "bad-signature"
    verifier.accept(verifier.verify(data, sign(data, new_ctl), blobs, NOW, root=[canonical(v2)]))
    assert verifier.root_version == 2
    restarted = DesiredStateVerifier(TENANT, DEVICE, ROOT_PUB, tmp_path / "trust.json")
    assert restarted.root_version == 2
    data, blobs = manifest(3)
    with pytest.raises(TrustError) as info:  # v1 again: a rollback
        restarted.verify(data, sign(data, CONTROLLER_KEY), blobs, NOW, root=KIT.chain)
    assert info.value.refusal == "root-rollback"
