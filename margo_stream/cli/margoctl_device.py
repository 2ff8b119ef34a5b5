"""``margoctl device``: a device identity's lifecycle on the controller's allow-list (admin).

    margoctl device revoke ID [-o table|json|yaml]
    margoctl device allow ID [-o table|json|yaml]
    margoctl reload [-o table|json|yaml]

``revoke`` takes the identity off the tenant's allow-list: its live connection is closed at
once, later handshakes are refused, and that survives a controller restart. ``allow`` answers
for an identity that is allowed and is refused for a revoked one: a revoked device must enrol
again (or be re-issued with ``margo-certs device``). ``reload`` makes the controller re-read
the tenants' CA bundles, operators and allow files, as SIGHUP does.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from margo_stream.api_client import ApiClient
from margo_stream.cli import output


def add_parsers(commands: Any, common: argparse.ArgumentParser) -> None:
    device = commands.add_parser(
        "device", help="revoke or allow a device identity (admin)", parents=[common]
    )
    actions = device.add_subparsers(
        dest="action", required=True, metavar="ACTION", parser_class=type(device)
    )
    for name, text in (
        ("revoke", "revoke device ID: its connection is closed, later handshakes refused"),
        ("allow", "allow device ID (a revoked identity must enrol again instead)"),
    ):
        p = actions.add_parser(name, help=text, parents=[common], description=text)
        p.add_argument("id", metavar="ID")
        p.add_argument("-o", "--output", choices=output.FORMATS, default="table")
    p = commands.add_parser(
        "reload",
        help="re-read CA bundles, operators and allow files (admin), like SIGHUP",
        parents=[common],
    )
    p.add_argument("-o", "--output", choices=output.FORMATS, default="table")


def cmd_device(client: ApiClient, args: argparse.Namespace) -> None:
    if args.action == "revoke":
        item = client.revoke_device(args.id)
    else:
        item = client.allow_device(args.id)
    if args.output != "table":
        text = output.render_data(item, args.output)
    else:
        text = f"device {item.get('id')}: {item.get('state')} (certificate expires {item.get('not_after')})"
    sys.stdout.write(text + "\n")


def cmd_reload(client: ApiClient, args: argparse.Namespace) -> None:
    report = client.reload()
    if args.output != "table":
        text = output.render_data(report, args.output)
    else:
        text = (
            f"reloaded: tenants {','.join(report.get('tenants') or [])}, "
            f"{report.get('allow_files')} allow files, {report.get('identities')} identities"
        )
    sys.stdout.write(text + "\n")
