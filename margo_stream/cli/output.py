"""margoctl's output: kubectl-style tables, JSON and YAML.

Tables are plain text with columns separated by three spaces and no trailing blanks; times are
shown as ages ("12s", "5m", "3h", "2d"). JSON and YAML print the API's items unchanged.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

import yaml

FORMATS = ("table", "json", "yaml")
NONE = "<none>"


def parse_rfc3339(text: str | None) -> float | None:
    if not text:
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def age(ts: str | float | None, now: float | None = None) -> str:
    """Seconds since ``ts`` as a short age; ``<never>`` for none."""
    value = parse_rfc3339(ts) if isinstance(ts, str) else ts
    if value is None:
        return "<never>"
    seconds = max(0.0, (time.time() if now is None else now) - value)
    if seconds < 120:
        return f"{int(seconds)}s"
    if seconds < 120 * 60:
        return f"{int(seconds // 60)}m"
    if seconds < 48 * 3600:
        return f"{int(seconds // 3600)}h"
    return f"{int(seconds // 86400)}d"


def labels_text(labels: dict[str, Any] | None) -> str:
    if not labels:
        return NONE
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items()))


def cell(value: Any) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (dict, list)):
        return json.dumps(value, separators=(",", ":"), sort_keys=True)
    return str(value).replace("\n", " ")


def render_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    texts = [[cell(v) for v in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in texts:
        for i, value in enumerate(row):
            widths[i] = max(widths[i], len(value))
    lines = []
    for row in [list(headers), *texts]:
        lines.append("   ".join(v.ljust(widths[i]) for i, v in enumerate(row)).rstrip())
    return "\n".join(lines)


def render_data(data: Any, fmt: str) -> str:
    if fmt == "json":
        return json.dumps(data, indent=2, ensure_ascii=False)
    if fmt == "yaml":
        return yaml.safe_dump(data, sort_keys=False, allow_unicode=True).rstrip("\n")
    raise ValueError(f"unknown output format {fmt!r}")


# -- tables per resource -------------------------------------------------------------------

DEVICE_HEADERS = ("ID", "STATE", "CONNECTED", "LAST SEEN", "CONNECTIONS", "MANIFEST", "LABELS")


def device_row(item: dict[str, Any], now: float | None = None) -> list[Any]:
    return [
        item.get("id"),
        item.get("state") or "-",  # allowed | revoked | unknown (the identity's allow-list state)
        bool(item.get("connected")),
        age(item.get("last_seen"), now),
        item.get("connection_count"),
        item.get("manifest_version"),
        labels_text(item.get("labels")),
    ]


def devices_table(items: Sequence[dict[str, Any]], now: float | None = None) -> str:
    if not items:
        return "No devices found."
    return render_table(DEVICE_HEADERS, [device_row(i, now) for i in items])


def device_detail(item: dict[str, Any], now: float | None = None) -> str:
    """The device's row, then what does not fit a row: where from, stats, capabilities."""
    out = [render_table(DEVICE_HEADERS, [device_row(item, now)]), ""]
    facts = [
        ("Identity", item.get("state")),
        ("Certificate expires", item.get("not_after")),
        ("Remote", item.get("remote")),
        ("Connected since", item.get("connected_since")),
        ("First seen", item.get("first_seen")),
        ("Last seen", item.get("last_seen")),
    ]
    for name, value in facts:
        if value is not None:
            out.append(f"{name}: {value}")
    out.append(f"Reported labels: {labels_text(item.get('reported_labels'))}")
    for title, mapping in (
        ("Stats", item.get("stats")),
        ("Capabilities", item.get("capabilities")),
    ):
        out.append(f"{title}:" + ("" if mapping else f" {NONE}"))
        for key, value in sorted((mapping or {}).items()):
            out.append(f"  {key}: {cell(value)}")
    return "\n".join(out)


def deployments_table(items: Sequence[dict[str, Any]], now: float | None = None) -> str:
    if not items:
        return "No deployments found."
    rows = []
    for i in items:
        error = i.get("error") or {}
        components = i.get("components") or []
        ready = sum(1 for c in components if isinstance(c, dict) and c.get("state") == "installed")
        rows.append(
            [
                i.get("device"),
                i.get("deploymentId"),
                i.get("state"),
                f"{ready}/{len(components)}" if components else "-",
                i.get("manifestVersion"),
                age(i.get("updated_at"), now),
                error.get("message") if isinstance(error, dict) else error,
            ]
        )
    return render_table(
        ("DEVICE", "DEPLOYMENT", "STATE", "COMPONENTS", "MANIFEST", "UPDATED", "ERROR"), rows
    )


def telemetry_table(items: Sequence[dict[str, Any]], now: float | None = None) -> str:
    if not items:
        return "No telemetry found."
    rows = []
    for i in items:
        fields = {k: v for k, v in i.items() if k not in ("seq", "stream", "received_at")}
        rows.append(
            [
                i.get("seq"),
                i.get("stream"),
                age(i.get("received_at"), now),
                json.dumps(fields, separators=(",", ":"), ensure_ascii=False),
            ]
        )
    return render_table(("SEQ", "STREAM", "AGE", "RECORD"), rows)


def sessions_table(items: Sequence[dict[str, Any]], now: float | None = None) -> str:
    if not items:
        return "No terminal sessions found."
    rows = [
        [
            i.get("id"),
            i.get("device"),
            i.get("operator"),
            age(i.get("started_at"), now),
            "active" if i.get("active") else i.get("reason") or "ended",
            i.get("bytes_in"),
            i.get("bytes_out"),
        ]
        for i in items
    ]
    return render_table(("ID", "DEVICE", "OPERATOR", "STARTED", "STATE", "IN", "OUT"), rows)


def event_line(item: dict[str, Any]) -> str:
    payload = item.get("payload") or {}
    details = " ".join(f"{k}={cell(v)}" for k, v in payload.items())
    return "   ".join(
        part
        for part in (str(item.get("ts")), str(item.get("kind")), item.get("device") or "-", details)
        if part
    )


def events_table(items: Sequence[dict[str, Any]], now: float | None = None) -> str:
    if not items:
        return "No events found."
    rows = [
        [
            i.get("id"),
            age(i.get("ts"), now),
            i.get("kind"),
            i.get("device"),
            " ".join(f"{k}={cell(v)}" for k, v in (i.get("payload") or {}).items()),
        ]
        for i in items
    ]
    return render_table(("ID", "AGE", "KIND", "DEVICE", "DETAILS"), rows)


def operators_table(items: Sequence[dict[str, Any]], now: float | None = None) -> str:
    if not items:
        return "No operators found."
    rows = [
        [i.get("name"), ",".join(i.get("roles") or []), i.get("expires") or "never (tenant token)"]
        for i in items
    ]
    return render_table(("NAME", "ROLES", "EXPIRES"), rows)


TABLES: dict[str, Callable[..., str]] = {
    "operators": operators_table,
    "devices": devices_table,
    "deployments": deployments_table,
    "telemetry": telemetry_table,
    "sessions": sessions_table,
    "events": events_table,
}


def render(kind: str, data: Any, fmt: str, now: float | None = None) -> str:
    """``data`` (a list of items, or one device for ``kind == "device"``) in ``fmt``."""
    if fmt != "table":
        return render_data(data, fmt)
    if kind == "device":
        return device_detail(data, now)
    return TABLES[kind](data, now)
