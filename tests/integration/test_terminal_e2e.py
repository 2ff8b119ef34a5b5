"""Terminal sessions end to end with real PTYs on both sides: margoctl (driven through a PTY
by pexpect) -> WebSocket -> controller -> QUIC stream -> agent -> PTY or pipes."""

from __future__ import annotations

import json
import os
import pwd
import signal
import subprocess
import sys
from pathlib import Path

import pexpect
import pytest

from tests.harness import BIN, Agent, Controller, pid_alive, wait_for

pytestmark = pytest.mark.integration


class Env:
    def __init__(self, pki, tmp: Path) -> None:
        self.pki = pki
        self.tmp = tmp
        self.ctl = Controller(pki, tmp / "data")
        self.agents: list[Agent] = []
        self.children: list[pexpect.spawn] = []

    def agent(self, device: str = "press-01", tenant: str = "acme", *extra: str) -> Agent:
        ident = self.pki.dir / tenant / "devices" / device
        if not ident.exists():
            self.pki.device(tenant, device)
        agent = Agent(
            ident,
            self.ctl.quic,
            self.tmp / f"{tenant}-{device}",
            extra=["--keepalive", "0.5", *extra],
        )
        self.agents.append(agent)
        self.ctl.wait_connected(self.pki.token(tenant), device)
        return agent

    def margoctl_args(self, tenant: str = "acme") -> list[str]:
        return [
            str(BIN / "margoctl"),
            "--api",
            self.ctl.api,
            "--token-file",
            str(self.pki.token_file(tenant)),
        ]

    def run(
        self, *args: str, tenant: str = "acme", stdin: str | None = None, timeout: float = 30
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*self.margoctl_args(tenant), *args],
            input=stdin,
            stdin=None if stdin is not None else subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def spawn(self, *args: str, rows: int = 24, cols: int = 80) -> pexpect.spawn:
        argv = [*self.margoctl_args(), *args]
        child = pexpect.spawn(
            argv[0],
            argv[1:],
            dimensions=(rows, cols),
            timeout=15,
            encoding="utf-8",
            env={**os.environ, "TERM": "xterm"},
        )
        self.children.append(child)
        return child

    def sessions(self, tenant: str = "acme") -> list[dict]:
        r = self.run("get", "sessions", "-o", "json", tenant=tenant)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    def stop(self) -> None:
        for child in self.children:
            child.close(force=True)
        for agent in self.agents:
            agent.stop()
        self.ctl.stop()


@pytest.fixture
def env(pki, tmp_path):
    e = Env(pki, tmp_path)
    yield e
    e.stop()


def test_exec_gives_output_and_exit_status(env):
    env.agent()
    r = env.run("exec", "press-01", "--", "sh", "-c", "echo out; echo err >&2; exit 3")
    assert (r.returncode, r.stdout, r.stderr) == (3, "out\n", "err\n")
    # stdin is forwarded and its end reaches the command
    r = env.run("exec", "press-01", "--", "sh", "-c", "tr a-z A-Z; echo done", stdin="hello\nworld")
    assert (r.returncode, r.stdout) == (0, "HELLO\nWORLDdone\n"), r.stderr
    # a command killed by a signal: 128 + N, like a shell
    r = env.run("exec", "press-01", "--", "sh", "-c", "kill -TERM $$")
    assert r.returncode == 128 + signal.SIGTERM
    # the audit records each session: the operator's name, command, status, bytes
    audits = env.sessions()
    first = audits[-1]
    assert first["command"] == "sh -c 'echo out; echo err >&2; exit 3'"
    assert first["exit_status"] == 3 and first["active"] is False
    assert first["operator"] == "admin" and env.pki.token("acme") not in first["operator"]
    assert first["bytes_out"] == len("out\nerr\n") and first["ended_at"]
    assert audits[-2]["bytes_in"] == len("hello\nworld")


def test_interactive_session_echoes_and_follows_resizes(env):
    env.agent()
    child = env.spawn("terminal", "press-01", "--", "/bin/sh", rows=24, cols=80)
    child.sendline("echo ab''cd")  # the echo of what we typed, then the command's output
    child.expect_exact("echo ab''cd")
    child.expect_exact("abcd")
    child.sendline("stty size")
    child.expect(r"24 80\s")
    child.setwinsize(40, 100)  # SIGWINCH to margoctl, which forwards the new size
    wait_for(
        lambda: (
            child.sendline("stty size"),
            child.expect([r"40 100\s", r"24 80\s"], timeout=2) == 0,
        )[1],
        timeout=10,
        what="resized remote terminal",
    )
    child.sendline("exit 7")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 7
    # the local terminal was put back (margoctl left raw mode): the audit is complete too
    audit = env.sessions()[0]
    assert audit["exit_status"] == 7 and audit["command"] == "/bin/sh"


def test_closing_the_operator_side_kills_the_remote_process_group(env):
    env.agent()
    child = env.spawn(
        "terminal", "press-01", "--", "/bin/sh", "-c", "sleep 600 & echo pids $$ $!; wait"
    )
    child.expect(r"pids (\d+) (\d+)")
    shell, sleeper = int(child.match.group(1)), int(child.match.group(2))
    assert pid_alive(shell) and pid_alive(sleeper)
    child.kill(signal.SIGKILL)  # the operator's side vanishes without a word
    wait_for(
        lambda: not pid_alive(shell) and not pid_alive(sleeper),
        timeout=15,
        what="remote process group killed",
    )
    audit = wait_for(
        lambda: (a := env.sessions()[0]) and not a["active"] and a, what="audit closed"
    )
    assert audit["reason"].startswith("exit") and "closed" in audit["reason"]


def test_a_device_of_another_tenant_cannot_be_reached(env):
    env.agent("press-01", "acme")
    r = env.run("exec", "press-01", "--", "true", tenant="globex")
    assert r.returncode == 255
    assert "no device 'press-01'" in r.stderr
    assert env.sessions("acme") == [] and env.sessions("globex") == []
    # and a wrong token is refused before anything happens
    bad = env.tmp / "bad.token"
    bad.write_text("not-a-token\n")
    r = subprocess.run(
        [
            str(BIN / "margoctl"),
            "--api",
            env.ctl.api,
            "--token-file",
            str(bad),
            "exec",
            "press-01",
            "--",
            "true",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
    )
    assert r.returncode == 255 and "token" in r.stderr


def test_sessions_run_as_nobody_unless_root_is_named(env):
    nobody = pwd.getpwnam("nobody")
    env.agent()  # an agent run as root, no --terminal-user: nobody, its home or /
    r = env.run("exec", "press-01", "--", "sh", "-c", "exec id -u")
    assert (r.returncode, r.stdout) == (0, f"{nobody.pw_uid}\n"), r.stderr
    r = env.run("exec", "press-01", "--", "sh", "-c", 'id -G; echo "$HOME $USER"; pwd')
    home_cwd = nobody.pw_dir if os.path.isdir(nobody.pw_dir) else "/"
    assert r.stdout == f"{nobody.pw_gid}\n{nobody.pw_dir} nobody\n{home_cwd}\n", r.stderr
    # on a PTY too, and the terminal is the user's, as after a login
    child = env.spawn(
        "terminal", "press-01", "--", "sh", "-c", "echo u=$(id -u)/$(stat -c %u $(tty))"
    )
    child.expect_exact(f"u={nobody.pw_uid}/{nobody.pw_uid}")
    child.expect(pexpect.EOF)
    # root only when named
    env.agent("press-02", "acme", "--terminal-user", "root")
    r = env.run("exec", "press-02", "--", "sh", "-c", "exec id -u")
    assert (r.returncode, r.stdout) == (0, "0\n"), r.stderr


def test_an_unknown_user_is_a_clear_start_up_error(env):
    ident = env.pki.device("acme", "press-03")
    for flag in ("--terminal-user", "--workload-user"):
        r = subprocess.run(
            [str(BIN / "margo-agent"), "--identity", str(ident), "--controller", env.ctl.quic]
            + ["--state", str(env.tmp / "press-03"), flag, "no-such-user"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert r.returncode == 2
        assert f"{flag} no-such-user: no such user on this device" in r.stderr


def test_a_disabled_agent_refuses(env):
    env.agent("press-01", "acme", "--no-terminal")
    r = env.run("exec", "press-01", "--", "true")
    assert r.returncode == 255
    assert "terminal access is disabled on this device" in r.stderr
    audit = env.sessions()[0]
    assert "disabled" in audit["reason"] and audit["exit_status"] is None


def test_session_limit_and_idle_timeout(env):
    env.agent("press-01", "acme", "--terminal-max-sessions", "1", "--terminal-idle-timeout", "1.5")
    child = env.spawn("terminal", "press-01", "--", "/bin/sh", "-c", "echo ready; sleep 600")
    child.expect_exact("ready")
    r = env.run("exec", "press-01", "--", "true")
    assert r.returncode == 255 and "limit 1" in r.stderr
    child.expect(pexpect.EOF, timeout=15)  # nothing moved for 1.5 s: the agent ends it
    child.close()
    assert child.exitstatus == 128 + signal.SIGHUP
    idle, refused = env.sessions()[-1], env.sessions()[-2]
    assert "idle for 1.5 s" in idle["reason"] and idle["exit_status"] == -signal.SIGHUP
    assert "limit 1" in refused["reason"]
    r = env.run("exec", "press-01", "--", "echo", "again")  # the slot is free again
    assert (r.returncode, r.stdout) == (0, "again\n")


def test_controller_restart_ends_sessions_with_a_clear_message(env):
    agent = env.agent()
    # margoctl inside a local shell, which reports margoctl's status and the terminal's
    # modes after it: raw mode must be undone even though the session ended in an error
    local = " ".join(
        [
            *env.margoctl_args(),
            "terminal",
            "press-01",
            "--",
            "/bin/sh",
            "-c",
            "'echo pid $$; sleep 600'",
        ]
    )
    child = pexpect.spawn(
        "/bin/sh",
        ["-c", f"stty -a; {local}; echo STATUS=$?; stty -a"],
        dimensions=(24, 80),
        timeout=15,
        encoding="utf-8",
    )
    env.children.append(child)
    child.expect(r"\bicanon\b")  # cooked mode before
    child.expect(r"pid (\d+)")
    shell = int(child.match.group(1))
    quic_port = env.ctl.quic_port
    env.ctl.stop()
    child.expect_exact("controller shutting down")
    child.expect_exact("STATUS=255")
    child.expect(r"(-?)icanon .*?(-?)echo\b", timeout=5)
    assert child.match.group(1) == "" and child.match.group(2) == "", "terminal left in raw mode"
    child.expect(pexpect.EOF)
    # the device ends the session too: the link that carried it is gone
    wait_for(lambda: not pid_alive(shell), timeout=15, what="remote shell ended")
    env.ctl = Controller(env.pki, env.tmp / "data", quic_port=quic_port)
    env.ctl.wait_connected(env.pki.token("acme"), "press-01")
    assert agent.alive()
    r = env.run("exec", "press-01", "--", "echo", "back")
    assert (r.returncode, r.stdout) == (0, "back\n")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-v"]))
