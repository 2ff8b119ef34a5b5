"""Who workloads and terminals run as (agent.users) and the directories such a user is given
(agent.runtime.workdirs). The suite runs as root; ``nobody`` is a real user here."""

from __future__ import annotations

import os
import pwd
from pathlib import Path

import pytest

from agent.runtime import workdirs
from agent.runtime.base import ComponentPaths
from agent.users import RunAs, popen_args, resolve_user
from margo_stream.errors import ConfigError
from margo_stream.state.spec import ComponentSpec, ProfileType

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")

NOBODY = RunAs.from_entry(pwd.getpwnam("nobody"))


def test_root_agent_defaults_to_nobody_and_runs_root_only_when_named() -> None:
    assert resolve_user(None, "--workload-user") == NOBODY and NOBODY.switches
    root = resolve_user("root", "--terminal-user")
    assert root.uid == 0 and not root.switches
    assert popen_args(root) == {"umask": 0o022}
    assert popen_args(NOBODY) == {
        "umask": 0o022,
        "user": NOBODY.uid,
        "group": NOBODY.gid,
        "extra_groups": [],
    }
    with pytest.raises(ConfigError, match="--terminal-user no-such-user: no such user"):
        resolve_user("no-such-user", "--terminal-user")


def test_missing_nobody_asks_for_a_user(monkeypatch: pytest.MonkeyPatch) -> None:
    def getpwnam(name: str) -> pwd.struct_passwd:
        raise KeyError(name)

    monkeypatch.setattr(pwd, "getpwnam", getpwnam)
    with pytest.raises(ConfigError, match="no 'nobody' user.*pass --workload-user NAME"):
        resolve_user(None, "--workload-user")


def test_an_unprivileged_agent_runs_everything_as_itself(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: NOBODY.uid)
    monkeypatch.setattr(os, "getegid", lambda: NOBODY.gid)
    own = resolve_user(None, "--terminal-user")
    assert own == NOBODY and not own.switches
    assert resolve_user("nobody", "--terminal-user") == NOBODY
    with pytest.raises(ConfigError, match="cannot switch users"):
        resolve_user("root", "--workload-user")


def _paths(state: Path, working_dir: str | None) -> tuple[ComponentPaths, ComponentSpec]:
    spec = ComponentSpec(
        deployment_id="dep",
        name="comp",
        profile=ProfileType.PROCESS,
        command=("true",),
        working_dir=working_dir,
    )
    return ComponentPaths.for_component(state, spec), spec


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o7777


def test_a_workload_user_gets_its_directory_and_passes_through_the_rest(tmp_path: Path) -> None:
    state = tmp_path / "state"
    workdirs.secure_state_dir(state, traversable=True)
    (state / "desired").mkdir(mode=0o755)
    (state / "desired").chmod(0o755)
    workdirs.secure_state_dir(state, traversable=True)  # an agent restart: privates again
    assert _mode(state / "desired") == 0o700
    paths, spec = _paths(state, "a/b")
    (paths.files_dir / "sub").mkdir(parents=True)
    workdirs.prepare(paths, spec, NOBODY)
    dep = paths.deployment_dir
    assert [_mode(d) for d in (state, state / "work", dep, dep / "a")] == [0o711] * 4
    st = paths.working_dir.stat()
    assert (st.st_uid, st.st_gid, _mode(paths.working_dir)) == (NOBODY.uid, NOBODY.gid, 0o700)
    for d in (paths.files_dir, paths.files_dir / "sub"):
        assert (d.stat().st_uid, d.stat().st_gid, _mode(d)) == (0, NOBODY.gid, 0o750)
    workdirs.secure_state_dir(state, traversable=False)  # back to root: nothing passes
    assert _mode(state) == 0o700


def test_missing_parents_are_made_passable_and_closed_ones_named(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    state = tmp_path / "made" / "by" / "agent" / "state"
    workdirs.secure_state_dir(state, traversable=True)
    assert [_mode(d) for d in (state.parent, state.parent.parent)] == [0o711] * 2
    assert f"cannot pass through {tmp_path}" in caplog.text  # pytest makes it 0700
    caplog.clear()
    workdirs.secure_state_dir(state, traversable=False)
    assert "cannot pass through" not in caplog.text


def test_a_symlink_planted_on_the_way_is_not_followed(tmp_path: Path) -> None:
    state = tmp_path / "state"
    workdirs.secure_state_dir(state, traversable=True)
    victim = tmp_path / "victim"
    victim.mkdir(mode=0o700)
    paths, spec = _paths(state, "own/inner")
    (paths.deployment_dir / "own").mkdir(parents=True)
    os.chown(paths.deployment_dir / "own", NOBODY.uid, NOBODY.gid)  # another component's
    (paths.deployment_dir / "own" / "inner").symlink_to(victim)  # planted by the workload
    with pytest.raises(OSError):
        workdirs.prepare(paths, spec, NOBODY)
    assert victim.stat().st_uid == 0 and _mode(victim) == 0o700


def test_the_deployment_and_files_directories_are_never_handed_over(tmp_path: Path) -> None:
    state = tmp_path / "state"
    for working_dir in (".", "files", "files/x"):
        paths, spec = _paths(state, working_dir)
        workdirs.prepare(paths, spec, NOBODY)
        assert paths.working_dir.is_dir() and paths.working_dir.stat().st_uid == 0
