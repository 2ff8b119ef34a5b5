"""``margo-certs``: create the per-tenant PKI and issue device identities.

    margo-certs init   --dir DIR --tenant acme [--tenant globex] [--host H ...] [--days N]
                       [--wfm-id ID]
    margo-certs device --dir DIR --tenant acme --device press-01 [--days N]
    margo-certs operator --dir DIR --tenant acme --name alice --role deployer [--role R] [--days N]
    margo-certs rotate-root --dir DIR --tenant acme
    margo-certs bootstrap --dir DIR --tenant acme --device press-09 [--ttl 24h]

``operator`` and ``rotate-root`` need the tenant's offline root key (``DIR/<tenant>/root.key``).

Errors are one line on stderr (``margo-certs: error: ...``) and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import NoReturn

from margo_stream.errors import MargoError
from margo_stream.identity.bootstrap import issue_bootstrap_token, parse_duration
from margo_stream.identity.pki import (
    DEFAULT_CA_DAYS,
    DEFAULT_DEVICE_DAYS,
    DEFAULT_HOSTS,
    FileGroup,
    device_files,
    init_pki,
    issue_device,
)
from margo_stream.identity.tenant_files import (
    DEFAULT_OPERATOR_DAYS,
    issue_operator,
    rotate_root,
)

PROG = "margo-certs"


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line and never exits from inside parse_args."""

    def error(self, message: str) -> NoReturn:
        raise _UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="Create margo-stream's per-tenant PKI and issue device identities.",
    )
    sub = parser.add_subparsers(
        dest="command",
        metavar="{init,device,operator,rotate-root,bootstrap}",
        parser_class=_Parser,
    )
    sub.required = True

    init = sub.add_parser(
        "init",
        help="create (or complete) the controller CA, server certificate and tenant CAs",
        description="Create the PKI under DIR. Existing keys, certificates and tokens are kept.",
    )
    init.add_argument("--dir", required=True, type=Path, help="PKI directory")
    init.add_argument(
        "--tenant",
        action="append",
        required=True,
        metavar="NAME",
        help="tenant (SPIFFE trust domain); repeat for several",
    )
    init.add_argument(
        "--host",
        action="append",
        metavar="HOST",
        help=f"DNS name or IP for the controller certificate; repeat "
        f"(default: {', '.join(DEFAULT_HOSTS)})",
    )
    init.add_argument(
        "--days",
        type=int,
        default=DEFAULT_CA_DAYS,
        help=f"lifetime of CAs and the server certificate (default {DEFAULT_CA_DAYS})",
    )
    init.add_argument(
        "--wfm-id",
        metavar="ID",
        help="id in each tenant's fleet-manager certificate, spiffe://<tenant>/margo/wfm/<ID> "
        "(default: the id already issued, else 'controller')",
    )

    device = sub.add_parser(
        "device",
        help="issue a device's key and X.509-SVID",
        description="Issue a fresh key and certificate for a device (re-run to renew).",
    )
    device.add_argument("--dir", required=True, type=Path, help="PKI directory")
    device.add_argument("--tenant", required=True, metavar="NAME", help="the device's tenant")
    device.add_argument("--device", required=True, metavar="ID", help="device id")
    device.add_argument(
        "--days",
        type=int,
        default=DEFAULT_DEVICE_DAYS,
        help=f"certificate lifetime in days (default {DEFAULT_DEVICE_DAYS})",
    )

    operator = sub.add_parser(
        "operator",
        help="certify a named operator with roles (needs the offline root key)",
        description="Write DIR/<tenant>/operators/<name>/{operator.key, operator.cert.json, "
        "operator.token}. Re-run to renew or change roles: key and token are kept.",
    )
    operator.add_argument("--dir", required=True, type=Path, help="PKI directory")
    operator.add_argument("--tenant", required=True, metavar="NAME", help="the tenant")
    operator.add_argument("--name", required=True, metavar="NAME", help="operator name")
    operator.add_argument(
        "--role",
        action="append",
        required=True,
        metavar="ROLE",
        help="viewer, deployer, terminal or admin; repeat for several",
    )
    operator.add_argument(
        "--days",
        type=int,
        default=DEFAULT_OPERATOR_DAYS,
        help=f"certificate lifetime in days (default {DEFAULT_OPERATOR_DAYS})",
    )

    rotate = sub.add_parser(
        "rotate-root",
        help="replace the tenant's root key (needs the offline root key)",
        description="Write root metadata version N+1 signed by the old and the new root key; "
        "the old key is kept as root.key.<N>; operator certificates are re-signed.",
    )
    rotate.add_argument("--dir", required=True, type=Path, help="PKI directory")
    rotate.add_argument("--tenant", required=True, metavar="NAME", help="the tenant")

    boot = sub.add_parser(
        "bootstrap",
        help="write a one-time enrolment token for a device (EST, margo-agent enroll)",
        description="Write DIR/<tenant>/bootstrap/<device>.token (the secret, for the device's "
        "installer) and <device>.json (what the controller checks). The token works once, for "
        "this tenant and device only, until it expires; re-run to replace it.",
    )
    boot.add_argument("--dir", required=True, type=Path, help="PKI directory")
    boot.add_argument("--tenant", required=True, metavar="NAME", help="the device's tenant")
    boot.add_argument("--device", required=True, metavar="ID", help="device id")
    boot.add_argument("--ttl", default="24h", metavar="DURATION", help="e.g. 15m, 24h, 7d")
    return parser


def _print_groups(groups: Sequence[FileGroup]) -> None:
    for group in groups:
        print(group.describe())


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.command == "init":
            groups = init_pki(args.dir, args.tenant, args.host, days=args.days, wfm_id=args.wfm_id)
            _print_groups(groups)
            kept = sum(g.action == "kept" for g in groups)
            reissued = sum(g.action == "reissued" for g in groups)
            if kept:
                print(
                    f"kept {kept} existing file group(s); "
                    + (
                        f"{reissued} fleet-manager certificate(s) reissued (keys kept)"
                        if reissued
                        else "nothing was overwritten"
                    )
                )
        elif args.command == "operator":
            group = issue_operator(args.dir, args.tenant, args.name, args.role, days=args.days)
            _print_groups([FileGroup(*group)])
        elif args.command == "bootstrap":
            ttl = parse_duration(args.ttl, what="--ttl")
            path, expires = issue_bootstrap_token(args.dir, args.tenant, args.device, ttl)
            when = datetime.fromtimestamp(expires, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            print(
                f"written   {args.tenant} bootstrap token for {args.device} "
                f"(one use, until {when}): {path}"
            )
        elif args.command == "rotate-root":
            _print_groups([FileGroup(*g) for g in rotate_root(args.dir, args.tenant)])
            print("move root.key (and the kept root.key.<N>) back offline")
        else:
            ddir = issue_device(args.dir, args.tenant, args.device, days=args.days)
            names = ", ".join(p.name for p in device_files(ddir))
            print(
                f"written   {args.tenant} device {args.device} identity "
                f"({args.days} days): {ddir}/{{{names}}}"
            )
    except _UsageError as exc:
        return _fail(str(exc))
    except MargoError as exc:
        return _fail(str(exc))
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        return _fail(f"{where}{exc.strerror or exc}")
    return 0


def _fail(message: str) -> int:
    print(f"{PROG}: error: {' '.join(message.split())}", file=sys.stderr)
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
