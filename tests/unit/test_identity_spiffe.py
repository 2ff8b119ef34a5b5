"""SPIFFE ID parsing and device-id rules."""

from __future__ import annotations

import pytest

from margo_stream.errors import IdentityError
from margo_stream.identity.spiffe import (
    SpiffeId,
    device_spiffe_id,
    parse_device_spiffe_id,
    parse_spiffe_id,
    validate_device_id,
    validate_tenant,
)


@pytest.mark.parametrize(
    ("uri", "domain", "path"),
    [
        ("spiffe://acme", "acme", ""),
        ("spiffe://acme/margo/client/press-01", "acme", "/margo/client/press-01"),
        ("spiffe://plant-7.example_org/margo/wfm/fm1", "plant-7.example_org", "/margo/wfm/fm1"),
        ("spiffe://acme/margo/client/A.b_c~d-9", "acme", "/margo/client/A.b_c~d-9"),
    ],
)
def test_parse_good(uri: str, domain: str, path: str) -> None:
    sid = parse_spiffe_id(uri)
    assert sid == SpiffeId(domain, path)
    assert str(sid) == uri


@pytest.mark.parametrize(
    ("uri", "complaint"),
    [
        ("", "empty"),
        ("acme/margo/client/x", "no 'spiffe://' scheme"),
        ("https://acme/margo/client/x", "scheme must be 'spiffe'"),
        ("SPIFFE://acme/x", "scheme must be 'spiffe'"),
        ("spiffe://Acme/x", "lowercase"),
        ("spiffe://acme:443/x", "port"),
        ("spiffe://user@acme/x", "userinfo"),
        ("spiffe://acme/x?y=1", "query"),
        ("spiffe://acme/x#frag", "fragment"),
        ("spiffe:///x", "trust domain is missing"),
        ("spiffe://acme/", "empty segment"),
        ("spiffe://acme//x", "empty segment"),
        ("spiffe://acme/x/", "empty segment"),
        ("spiffe://acme/../x", "dot segment"),
        ("spiffe://acme/a/./b", "dot segment"),
        ("spiffe://acme/a%20b", "path segment"),
        ("spiffe://acme/a b", "path segment"),
        ("spiffe://ac me/x", "lowercase"),
        ("spiffe://acme/" + "a" * 2100, "longer than"),
    ],
)
def test_parse_bad(uri: str, complaint: str) -> None:
    with pytest.raises(IdentityError) as info:
        parse_spiffe_id(uri)
    assert complaint in str(info.value)
    assert "\n" not in str(info.value)


def test_device_spiffe_id_round_trip() -> None:
    uri = device_spiffe_id("acme", "press-01")
    assert uri == "spiffe://acme/margo/client/press-01"
    assert parse_device_spiffe_id(uri) == ("acme", "press-01")


@pytest.mark.parametrize("bad", ["", "a/b", "a b", "é", "..", ".", "x:y"])
def test_bad_device_ids(bad: str) -> None:
    with pytest.raises(IdentityError):
        validate_device_id(bad)
    with pytest.raises(IdentityError):
        device_spiffe_id("acme", bad)


@pytest.mark.parametrize("bad", ["", "Acme", "acme:1", "a/b", "a b", "x" * 256])
def test_bad_tenants(bad: str) -> None:
    with pytest.raises(IdentityError, match="tenant name"):
        validate_tenant(bad)


@pytest.mark.parametrize(
    "uri",
    [
        "spiffe://acme",
        "spiffe://acme/margo/wfm/fm1",
        "spiffe://acme/margo/client",
        "spiffe://acme/margo/client/a/b",
        "spiffe://acme/other/client/a",
    ],
)
def test_not_a_device_id(uri: str) -> None:
    with pytest.raises(IdentityError, match="not a device id"):
        parse_device_spiffe_id(uri)
