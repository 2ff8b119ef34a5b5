"""A telemetry record's stream (its series): named by the producer, kept with the record.

The producer socket names every record's stream once, when it parses the line; the buffer
keeps that name beside the payload. ``stream_of`` finds it in the payload itself, for the
records that came without one: those of API callers that named none, and those written in
the buffer's version-1 record format (before names were kept)."""

from __future__ import annotations

import json

DEFAULT_STREAM = "default"


def stream_of(payload: bytes) -> str:
    """The ``stream`` of a JSON object payload; ``default`` for anything else."""
    try:
        value = json.loads(payload).get("stream")
    except (ValueError, AttributeError):
        return DEFAULT_STREAM
    return value if isinstance(value, str) and value else DEFAULT_STREAM
