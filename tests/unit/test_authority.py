"""The tenant's root of trust and what operators author, with real Ed25519 keys."""

from __future__ import annotations

import copy
import datetime as dt
import json

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from margo_stream.errors import AuthorityError
from margo_stream.identity import envelope
from margo_stream.identity.authored import (
    NonceLedger,
    make_grant,
    sign_deployment,
    verify_deployment,
    verify_grant,
)
from margo_stream.identity.authority import (
    Role,
    TrustedRoot,
    make_operator_cert,
    make_root,
    read_root,
    verify_operator,
)

NOW = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
LATER = NOW + dt.timedelta(days=365)
DIGEST = "sha256:" + "a" * 64


def refusal(exc: pytest.ExceptionInfo[AuthorityError]) -> str:
    return str(exc.value.refusal)


@pytest.fixture
def keys() -> dict[str, Ed25519PrivateKey]:
    return {n: Ed25519PrivateKey.generate() for n in ("root", "root2", "ctl", "alice", "mallory")}


def root_v(keys, version: int, root_names=("root",), signers=("root",), expires=LATER):
    return make_root(
        "acme",
        version,
        expires,
        root_keys=[keys[n].public_key() for n in root_names],
        controller_keys=[keys["ctl"].public_key()],
        signers=[keys[n] for n in signers],
    )


def trusted(keys) -> TrustedRoot:
    return TrustedRoot.from_pinned("acme", keys["root"].public_key(), root_v(keys, 1), NOW)


def test_the_first_root_metadata_is_checked_against_the_pinned_key(keys) -> None:
    root = trusted(keys)
    assert root.current.version == 1 and root.current.tenant == "acme"
    assert envelope.key_id(keys["ctl"].public_key()) in root.current.role_keys("controller")[0]
    with pytest.raises(AuthorityError, match="pinned"):
        TrustedRoot.from_pinned("acme", keys["mallory"].public_key(), root_v(keys, 1), NOW)
    forged = root_v(keys, 1, root_names=("mallory",), signers=("mallory",))
    with pytest.raises(AuthorityError):
        TrustedRoot.from_pinned("acme", keys["root"].public_key(), forged, NOW)
    with pytest.raises(AuthorityError) as info:
        TrustedRoot.from_pinned("globex", keys["root"].public_key(), root_v(keys, 1), NOW)
    assert refusal(info) == "wrong-tenant"


def test_rotation_needs_the_old_and_the_new_root_keys(keys) -> None:
    root = trusted(keys)
    v2 = root_v(keys, 2, root_names=("root2",), signers=("root", "root2"))
    rotated = root.update([v2], NOW)
    assert rotated.current.version == 2
    assert root.current.version == 1  # immutable

    only_new = root_v(keys, 2, root_names=("root2",), signers=("root2",))
    with pytest.raises(AuthorityError, match="previous root keys") as info:
        root.update([only_new], NOW)
    assert refusal(info) == "bad-signature"
    only_old = root_v(keys, 2, root_names=("root2",), signers=("root",))
    with pytest.raises(AuthorityError, match="its own root keys"):
        root.update([only_old], NOW)

    # and v3 by root2 alone follows on from v2
    v3 = root_v(keys, 3, root_names=("root2",), signers=("root2",))
    assert root.update([v2, v3], NOW).current.version == 3
    with pytest.raises(AuthorityError):
        root.update([v3], NOW)  # skips v2


def test_root_rollback_and_expiry_are_refused(keys) -> None:
    root = trusted(keys).update([root_v(keys, 2, signers=("root",))], NOW)
    with pytest.raises(AuthorityError) as info:
        root.update([root_v(keys, 1)], NOW)
    assert refusal(info) == "root-rollback"
    assert root.update([root.current.envelope], NOW).current.version == 2  # the same: no-op
    old = root_v(keys, 3, expires=NOW - dt.timedelta(days=1))
    with pytest.raises(AuthorityError) as info:
        root.update([old], NOW)
    assert refusal(info) == "expired"


def test_tampered_root_metadata_does_not_verify(keys) -> None:
    env = root_v(keys, 1)
    env["signed"]["roles"]["controller"]["keyids"] = [envelope.key_id(keys["mallory"].public_key())]
    env["signed"]["keys"][envelope.key_id(keys["mallory"].public_key())] = envelope.public_key_doc(
        keys["mallory"].public_key()
    )
    with pytest.raises(AuthorityError) as info:
        TrustedRoot.from_pinned("acme", keys["root"].public_key(), env, NOW)
    assert refusal(info) == "bad-signature"


def test_malformed_root_metadata_is_named(keys) -> None:
    with pytest.raises(AuthorityError, match="not JSON"):
        read_root(b"{nope")
    with pytest.raises(AuthorityError, match="not 'margo-root'"):
        read_root(json.dumps({"signed": {"_type": "margo-operator"}, "signatures": []}))
    with pytest.raises(AuthorityError, match="bytes, more than"):
        read_root(b" " * 100_000)


def operator_cert(keys, name="alice", roles=(Role.DEPLOYER,), signer="root", expires=LATER):
    return make_operator_cert(
        "acme",
        name,
        roles,
        keys[name].public_key(),
        issued=NOW,
        expires=expires,
        signers=[keys[signer]],
    )


def test_operator_certificates(keys) -> None:
    meta = trusted(keys).current
    op = verify_operator(operator_cert(keys), meta, NOW, role=Role.DEPLOYER)
    assert op.name == "alice" and op.roles == {Role.DEPLOYER}
    with pytest.raises(AuthorityError) as info:
        verify_operator(operator_cert(keys), meta, NOW, role=Role.TERMINAL)
    assert refusal(info) == "role-missing"
    admin = operator_cert(keys, roles=(Role.ADMIN,))
    assert verify_operator(admin, meta, NOW, role=Role.TERMINAL).may(Role.DEPLOYER)
    with pytest.raises(AuthorityError) as info:
        verify_operator(operator_cert(keys, signer="ctl"), meta, NOW)  # the controller's key
    assert refusal(info) == "bad-signature"
    with pytest.raises(AuthorityError) as info:
        verify_operator(operator_cert(keys, expires=NOW), meta, NOW)
    assert refusal(info) == "expired"


def test_a_memo_checks_a_signature_once_and_no_memo_checks_it_every_time(
    keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    checks: list[bytes] = []
    check = envelope.signature_ok

    def counting(key, signature: bytes, data: bytes) -> bool:
        checks.append(signature)
        return check(key, signature, data)

    monkeypatch.setattr(envelope, "signature_ok", counting)
    cert = operator_cert(keys)
    root = keys["root"].public_key()
    kid = envelope.key_id(root)
    for _ in range(3):  # a device: every push's signatures are its own work
        assert envelope.signers(cert, {kid: root}) == {kid}
    assert len(checks) == 3
    memo = envelope.SignatureMemo()
    checks.clear()
    for _ in range(3):  # the controller: the certificate every apply carries
        assert envelope.signers(cert, {kid: root}, memo) == {kid}
    assert len(checks) == 1 and len(memo) == 1
    forged = copy.deepcopy(operator_cert(keys, signer="ctl"))
    forged["signatures"][0]["keyid"] = kid  # the controller's signature under the root's id
    for _ in range(2):  # a refusal is remembered as a refusal
        assert envelope.signers(forged, {kid: root}, memo) == set()
    assert len(checks) == 2 and len(memo) == 2
    for n in range(envelope.CHECKED_MAX):  # bounded: cleared when full
        memo.check(keys["root"].public_key(), n.to_bytes(64, "big"), b"data")
    assert len(memo) <= envelope.CHECKED_MAX


def test_deployment_signatures(keys) -> None:
    meta = trusted(keys).current
    cert = operator_cert(keys)
    sig = sign_deployment("acme", "web", DIGEST, keys["alice"], now=NOW)
    checked = verify_deployment(sig, cert, meta, deployment_id="web", digest=DIGEST, now=NOW)
    assert checked.operator.name == "alice" and checked.signed_at == NOW

    other = "sha256:" + "b" * 64
    with pytest.raises(AuthorityError) as info:  # a changed document is not the signed one
        verify_deployment(sig, cert, meta, deployment_id="web", digest=other, now=NOW)
    assert refusal(info) == "digest-mismatch"
    forged = sign_deployment("acme", "web", DIGEST, keys["mallory"], now=NOW)
    with pytest.raises(AuthorityError) as info:
        verify_deployment(forged, cert, meta, deployment_id="web", digest=DIGEST, now=NOW)
    assert refusal(info) == "bad-signature"
    viewer = operator_cert(keys, roles=(Role.VIEWER, Role.TERMINAL))
    with pytest.raises(AuthorityError) as info:
        verify_deployment(sig, viewer, meta, deployment_id="web", digest=DIGEST, now=NOW)
    assert refusal(info) == "role-missing"


def test_terminal_grants_are_for_one_device_command_and_use(keys) -> None:
    meta = trusted(keys).current
    cert = operator_cert(keys, roles=(Role.TERMINAL,))
    grant = make_grant(
        "acme", "press-01", ["id"], tty=False, operator="alice", key=keys["alice"], now=NOW
    )

    def check(**kw):
        args = {"device": "press-01", "command": ["id"], "tty": False, "now": NOW} | kw
        return verify_grant(grant, cert, meta, **args)

    checked = check()
    assert checked.operator.name == "alice" and checked.command == ("id",)
    for kw, code in (
        ({"device": "press-02"}, "wrong-device"),
        ({"command": ["sh"]}, "malformed"),
        ({"tty": True}, "malformed"),
        ({"now": NOW + dt.timedelta(seconds=61)}, "expired"),
    ):
        with pytest.raises(AuthorityError) as info:
            check(**kw)
        assert refusal(info) == code, kw
    deployer = operator_cert(keys, roles=(Role.DEPLOYER,))
    with pytest.raises(AuthorityError) as info:
        verify_grant(grant, deployer, meta, device="press-01", command=["id"], tty=False, now=NOW)
    assert refusal(info) == "role-missing"

    ledger = NonceLedger()
    ledger.use(checked, NOW)
    with pytest.raises(AuthorityError) as info:
        ledger.use(checked, NOW)
    assert refusal(info) == "replayed"
    ledger.use(checked, NOW + dt.timedelta(seconds=61))  # forgotten once the grant expired
    with pytest.raises(ValueError):
        make_grant(
            "acme", "d", None, tty=True, operator="a", key=keys["alice"], now=NOW, seconds=301
        )
