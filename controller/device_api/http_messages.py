"""HTTP request pieces the device-facing servers (HTTP/1.1 and HTTP/2) read the same way:
header lists as a lower-cased map, and a JSON request body with a size bound."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from controller.problems import Problem

MAX_BODY = 1 << 20


def header_map(headers: Mapping[bytes, bytes] | list[tuple[bytes, bytes]]) -> dict[str, str]:
    """Lower-case header names to values (repeated headers joined with ``, ``)."""
    items = headers.items() if isinstance(headers, Mapping) else headers
    out: dict[str, str] = {}
    for name, value in items:
        key = name.decode("latin-1").lower()
        val = value.decode("latin-1")
        out[key] = f"{out[key]}, {val}" if key in out else val
    return out


def parse_json_body(body: bytes) -> Any:
    """The JSON value of a request body, or a 413/400 ``Problem``."""
    if len(body) > MAX_BODY:
        raise Problem(
            413,
            f"body is {len(body)} bytes, more than {MAX_BODY}",
            title="Content too large",
            kind="content-too-large",
        )
    try:
        return json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise Problem(
            400, f"body is not JSON: {exc}", title="Invalid request", kind="invalid-request"
        ) from None


__all__ = ["MAX_BODY", "header_map", "parse_json_body"]
