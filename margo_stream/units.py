"""Sizes given on command lines: ``8MiB``, ``512KiB``, ``1GiB``, ``1000000`` (bytes)."""

from __future__ import annotations

import re

from margo_stream.errors import ConfigError

_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "kib": 1 << 10,
    "m": 1000**2,
    "mb": 1000**2,
    "mib": 1 << 20,
    "g": 1000**3,
    "gb": 1000**3,
    "gib": 1 << 30,
    "t": 1000**4,
    "tb": 1000**4,
    "tib": 1 << 40,
}
_SIZE_RE = re.compile(r"(\d+(?:\.\d+)?)\s*([a-z]*)")


def parse_size(text: str, *, what: str = "size") -> int:
    """Bytes in ``8MiB``, ``500MB``, ``1.5GiB`` or a bare number of bytes (case-insensitive)."""
    match = _SIZE_RE.fullmatch(text.strip().lower())
    if match is None or match.group(2) not in _SIZE_UNITS:
        raise ConfigError(f"{what} {text!r} is not a size (examples: 8MiB, 500MB, 1GiB, 65536)")
    value = int(float(match.group(1)) * _SIZE_UNITS[match.group(2)])
    if value <= 0:
        raise ConfigError(f"{what} {text!r} must be more than zero bytes")
    return value


__all__ = ["parse_size"]
