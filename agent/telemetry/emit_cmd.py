"""``margo-agent emit --state DIR --stream NAME JSON``: hand one record to the running agent."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from agent.telemetry.ingest import SOCKET_NAME
from margo_stream.telemetry_client import TelemetryClient, TelemetryClientError


def run_emit(state_dir: Path, stream: str, json_text: str) -> int:
    """Send ``json_text`` (a JSON object) as a record of ``stream``; print its seq.

    Returns 0 on success; prints one line to stderr and returns 1 when the JSON is invalid,
    the agent is not running or the agent refused the record.
    """
    try:
        fields = json.loads(json_text)
    except ValueError as exc:
        print(f"margo-agent emit: not JSON: {exc}", file=sys.stderr)
        return 1
    if not isinstance(fields, dict):
        print("margo-agent emit: the record must be a JSON object", file=sys.stderr)
        return 1
    try:
        with TelemetryClient(Path(state_dir) / SOCKET_NAME, timeout=30.0) as client:
            seq = client.emit(stream, fields)
    except TelemetryClientError as exc:
        print(f"margo-agent emit: {exc}", file=sys.stderr)
        return 1
    print(seq)
    return 0
