"""``margoctl label``: set and remove a device's operator labels, like ``kubectl label``.

    margoctl label device ID k=v [k2=v2 ...] [k-] [-o table|json|yaml]

``k=v`` sets label ``k``, ``k-`` removes it; all changes are applied in one request (one
transaction: a bad label refuses them all). Prints the device's labels afterwards. These are
the labels ``apply --selector k=v`` matches; what a device reports of itself is matched only
by ``--selector reported.k=v``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from margo_stream.api_client import ApiClient
from margo_stream.cli import output
from margo_stream.errors import ConfigError


def add_parsers(commands: Any, common: argparse.ArgumentParser) -> None:
    label = commands.add_parser(
        "label", help="set or remove a device's operator labels", parents=[common]
    )
    kinds = label.add_subparsers(
        dest="kind", required=True, metavar="RESOURCE", parser_class=type(label)
    )
    p = kinds.add_parser(
        "device",
        help="label one device: k=v sets, k- removes",
        parents=[common],
        description="Set (k=v) or remove (k-) operator labels of device ID; selectors "
        "(apply --selector k=v) match these.",
    )
    p.add_argument("id", metavar="ID")
    p.add_argument("changes", nargs="+", metavar="k=v|k-")
    p.add_argument("-o", "--output", choices=output.FORMATS, default="table", help="output format")


def parse_changes(values: Sequence[str]) -> dict[str, str | None]:
    """``k=v`` -> ``{k: v}``, ``k-`` -> ``{k: None}``; the controller checks keys and values."""
    changes: dict[str, str | None] = {}
    for value in values:
        key, sep, val = value.partition("=")
        if sep and key:
            changes[key] = val
        elif not sep and len(value) > 1 and value.endswith("-"):
            changes[value[:-1]] = None
        else:
            raise ConfigError(f"invalid label change {value!r}: expected KEY=VALUE or KEY-")
    return changes


def cmd_label(client: ApiClient, args: argparse.Namespace) -> None:
    item = client.label_device(args.id, parse_changes(args.changes))
    if args.output != "table":
        text = output.render_data({"id": item.get("id"), "labels": item.get("labels")}, args.output)
    else:
        text = f"device {item.get('id')} labels: {output.labels_text(item.get('labels'))}"
    sys.stdout.write(text + "\n")
