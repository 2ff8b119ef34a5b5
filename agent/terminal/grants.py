"""Who may open a terminal on this device: an operator's signed grant, checked here.

A ``term_open`` must carry a grant signed by an operator whom the tenant's root certified with
the ``terminal`` (or ``admin``) role, for this device, this command (or the login shell) and
this terminal mode, not expired, and never used before (``margo_stream.identity.authored``). The
root is the root metadata the device trusts (from its pinned root key); the controller only
relays the grant, so holding every controller key opens no shell.

Used nonces are kept until their grant expires, on disk (``STATE/terminal/nonces.json``,
replaced atomically), so a grant cannot be replayed after an agent restart either.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from agent.terminal.manager import TerminalRefused
from margo_stream.errors import MargoError
from margo_stream.fsutil import atomic_write
from margo_stream.identity.authored import Grant, NonceLedger, verify_grant
from margo_stream.identity.authority import RootMetadata, format_time, parse_time
from margo_stream.protocol import messages as m

log = logging.getLogger("margo.agent.terminal")


class RootOfTrust(Protocol):
    """Where the device's trusted root metadata is (the desired-state verifier holds it)."""

    @property
    def root(self) -> RootMetadata | None: ...

    def adopt_root(self, chain: Sequence[bytes], now: dt.datetime) -> RootMetadata: ...


class GrantChecker:
    def __init__(self, device_id: str, trust: RootOfTrust, state_dir: Path) -> None:
        self.device_id = device_id
        self.trust = trust
        self.path = state_dir / "terminal" / "nonces.json"
        self.ledger = NonceLedger()
        try:
            raw = json.loads(self.path.read_text())
            self.ledger.load({str(n): parse_time(e, "nonce expiry") for n, e in raw.items()})
        except FileNotFoundError:
            pass
        except (OSError, ValueError, AttributeError, MargoError) as exc:
            # refusing every replayed grant matters more than a tidy file: start empty only
            # after saying so (the grants it held expire within minutes anyway)
            log.warning("unreadable %s (%s); used grants are forgotten", self.path, exc)

    def check(self, req: m.TermOpen, now: dt.datetime, offered: Sequence[bytes] = ()) -> Grant:
        """The verified grant of ``req`` (its nonce now used); ``TerminalRefused`` naming why.
        ``offered``: the root metadata of this session's hello answer, taken first when the
        device holds none yet (a terminal may arrive before the session adopted it)."""
        if req.grant is None or req.certificate is None:
            raise TerminalRefused(
                "no operator grant: terminals open only on a grant signed by an operator with "
                "the terminal role (margoctl terminal/exec signs one)"
            )
        root = self.trust.root
        if root is None and offered:
            try:
                root = self.trust.adopt_root(offered, now)
            except MargoError as exc:
                raise TerminalRefused(f"the tenant's root metadata was refused: {exc}") from None
        if root is None:
            raise TerminalRefused(
                "this device holds no root metadata of its tenant yet, so it cannot check "
                "operator grants (it arrives with the controller's answer to its hello)"
            )
        try:
            grant = verify_grant(
                req.grant,
                req.certificate,
                root,
                device=self.device_id,
                command=req.command,
                tty=req.tty,
                now=now,
            )
            self.ledger.use(grant, now)
        except MargoError as exc:
            raise TerminalRefused(f"operator grant refused: {exc}") from None
        self._save()
        return grant

    def _save(self) -> None:
        items = {n: format_time(e) for n, e in self.ledger.items().items()}
        try:
            self.path.parent.mkdir(mode=0o700, exist_ok=True)
            atomic_write(self.path, json.dumps(items).encode(), mode=0o600)
        except OSError as exc:
            log.warning("could not record a used terminal grant in %s: %s", self.path, exc)
