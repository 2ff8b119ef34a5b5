"""The users workloads and terminals run as (``--workload-user``, ``--terminal-user``).

An agent started as root runs both as ``nobody`` unless told otherwise; ``root`` only when an
operator names it. An agent that is not root cannot switch users: it runs them as itself, and
naming anyone else is a configuration error. A :class:`RunAs` that :attr:`~RunAs.switches`
is applied in the child between fork and exec (no supplementary groups, the user's primary
group, then the user id), never after exec.
"""

from __future__ import annotations

import os
import pwd
from dataclasses import dataclass
from typing import Any

from agent.config import AgentConfig
from margo_stream.errors import ConfigError

DEFAULT_USER = "nobody"
CHILD_UMASK = 0o022  # margo-agent's own umask is 077; the programs it starts get the usual one


@dataclass(frozen=True, slots=True)
class RunAs:
    """A user from the password database (or the agent's own uid when it has no entry)."""

    name: str
    uid: int
    gid: int  # the user's primary group; children get no supplementary groups
    home: str
    shell: str

    @property
    def switches(self) -> bool:
        """True when children must change uid/gid (the user is not the agent's own)."""
        return self.uid != os.geteuid() or self.gid != os.getegid()

    def describe(self) -> str:
        return f"{self.name} (uid {self.uid})"

    @classmethod
    def from_entry(cls, entry: pwd.struct_passwd) -> RunAs:
        return cls(entry.pw_name, entry.pw_uid, entry.pw_gid, entry.pw_dir, entry.pw_shell)

    @classmethod
    def current(cls) -> RunAs:
        """The agent's own user."""
        try:
            return cls.from_entry(pwd.getpwuid(os.geteuid()))
        except KeyError:  # a uid without a passwd entry (common in containers)
            uid = os.geteuid()
            return cls(str(uid), uid, os.getegid(), os.environ.get("HOME", "/"), "")


def popen_args(run_as: RunAs | None) -> dict[str, Any]:
    """``subprocess.Popen`` arguments that start the child as ``run_as`` (``None``: as the
    agent) with umask 022: the ids are changed in the child between fork and exec."""
    args: dict[str, Any] = {"umask": CHILD_UMASK}
    if run_as is not None and run_as.switches:
        args.update(user=run_as.uid, group=run_as.gid, extra_groups=[])
    return args


def resolve_user(name: str | None, flag: str) -> RunAs:
    """The user ``flag`` (``--workload-user`` / ``--terminal-user``) names, or the default.

    Raises ``ConfigError`` when the user does not exist, when the default ``nobody`` is
    missing, or when an agent that is not root is asked to run as someone else."""
    if os.geteuid() != 0:
        own = RunAs.current()
        if name is None or name == own.name:
            return own
        raise ConfigError(
            f"{flag} {name}: the agent runs as {own.describe()}, not root, and cannot switch "
            f"users; start it as root or leave {flag} out (it then uses {own.name})"
        )
    if name is None:
        try:
            return RunAs.from_entry(pwd.getpwnam(DEFAULT_USER))
        except KeyError:
            raise ConfigError(
                f"this device has no {DEFAULT_USER!r} user to run as by default; pass {flag} "
                "NAME with an unprivileged user (root only if that is really meant)"
            ) from None
    try:
        return RunAs.from_entry(pwd.getpwnam(name))
    except KeyError:
        raise ConfigError(f"{flag} {name}: no such user on this device") from None


def workload_user(config: AgentConfig) -> RunAs:
    """Who process workloads run as (compose and helm always run as the agent)."""
    return resolve_user(config.workload_user, "--workload-user")


def terminal_user(config: AgentConfig) -> RunAs:
    """Who terminal sessions run as."""
    return resolve_user(config.terminal_user, "--terminal-user")
