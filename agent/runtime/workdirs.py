"""The directories a process component needs, and who may enter them.

The agent's state directory is the agent's: ``margo-agent`` runs with umask 077, so what it
creates there is 0700/0600. When process workloads run as another user (``--workload-user``,
by default ``nobody``), that user is given exactly what its component needs::

    STATE/  STATE/work/  STATE/work/<deployment>/        0711, the agent's
    STATE/work/<deployment>/<component>/                 0700, the workload user's
    STATE/work/<deployment>/<component>.log              the workload user's (the agent writes)
    STATE/work/<deployment>/files/ and its directories   0750, the agent's, group: the user's

* 0711 (execute only for others) on the chain of directories down to the component's: the user
  can pass through to its working directory and log by name, but cannot list these
  directories nor open anything in them that is not opened up below. Without it a process of
  another user could not even reach its working directory.
* The working directory is the user's, so the workload can write there.
* The deployment's files stay the agent's, readable through the user's primary group but not
  writable: the agent writes them as root, and a directory the workload could write would let
  it plant a symlink that turns one of those writes onto any file of the device.

A working directory the agent does not create for the component is not handed over: an
absolute one belongs to the device; ``.`` (the deployment's directory, which the user can only
pass through) and anything under ``files/`` (readable through its group) stay the agent's, so
such a component cannot write its working directory.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path, PurePosixPath

from agent.runtime.base import ComponentPaths
from agent.users import RunAs
from margo_stream.state.spec import ComponentSpec

log = logging.getLogger("margo.agent.runtime")

TRAVERSE_MODE = 0o711
PRIVATE_DIR_MODE = 0o700
SHARED_DIR_MODE = 0o750  # the files: the agent's, readable by the workload user's group
_OPEN_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def secure_state_dir(state: Path, *, traversable: bool) -> None:
    """Create ``state`` and ``state/work``; make both 0711 if workloads of another user must
    pass through them (``traversable``), else 0700; take group and other access away from
    everything else directly in ``state`` (left by an older agent or another umask).

    Missing directories above ``state`` are created 0711 (a path, nothing to read). Existing
    ones are the operator's: a warning names any that another user cannot pass through."""
    missing = []
    parent = state.absolute().parent
    while not parent.exists():
        missing.append(parent)
        parent = parent.parent
    for d in reversed(missing):
        d.mkdir(exist_ok=True)
        os.chmod(d, TRAVERSE_MODE)
    state.mkdir(exist_ok=True, mode=PRIVATE_DIR_MODE)
    work = state / "work"
    work.mkdir(exist_ok=True, mode=PRIVATE_DIR_MODE)
    for child in state.iterdir():
        st = child.lstat()
        if child.name != "work" and (stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode)):
            os.chmod(child, stat.S_IMODE(st.st_mode) & 0o700)
    mode = TRAVERSE_MODE if traversable else PRIVATE_DIR_MODE
    os.chmod(state, mode)
    os.chmod(work, mode)
    closed = [d for d in state.resolve().parents if not os.stat(d).st_mode & stat.S_IXOTH]
    if traversable and closed:
        log.warning(
            "process workloads run as another user but cannot pass through %s to their "
            "working directories under %s (give it execute-only access for others, 0711)",
            ", ".join(map(str, closed)),
            state,
            extra={"event": "state-dir-closed"},
        )


def prepare(paths: ComponentPaths, spec: ComponentSpec, run_as: RunAs | None) -> None:
    """Create the component's working directory (unless absolute: it must exist) and, when it
    runs as another user, give that user what the module docstring says. Raises ``OSError``."""
    absolute = spec.working_dir is not None and PurePosixPath(spec.working_dir).is_absolute()
    if run_as is None or not run_as.switches:
        if not absolute:
            paths.working_dir.mkdir(parents=True, exist_ok=True)
        return
    dep = paths.deployment_dir
    dep.mkdir(parents=True, exist_ok=True)
    for d in (dep.parent.parent, dep.parent, dep):  # STATE, STATE/work, the deployment's
        os.chmod(d, TRAVERSE_MODE)
    if not absolute:
        parts = PurePosixPath(spec.working_dir or spec.name).parts
        parts = tuple(p for p in parts if p != ".")
        _make_under(dep, parts, None if not parts or parts[0] == "files" else run_as)
    share_files(paths.files_dir, run_as.gid)  # after: a working dir in files/ is shared too


def share_files(files_dir: Path, gid: int) -> None:
    """``files_dir`` and the directories in it: the agent's, group ``gid``, 0750. The files
    themselves are written 0644 by the reconciler; this directory gates them."""
    try:
        os.mkdir(files_dir, SHARED_DIR_MODE)
    except FileExistsError:
        pass
    fd = os.open(files_dir, _OPEN_DIR)
    try:
        os.fchown(fd, -1, gid)
        os.fchmod(fd, SHARED_DIR_MODE)
    finally:
        os.close(fd)
    for root, dirs, _files in os.walk(files_dir):  # does not follow symlinks
        for name in dirs:
            path = os.path.join(root, name)
            if os.path.islink(path):
                continue
            os.chown(path, -1, gid, follow_symlinks=False)
            os.chmod(path, SHARED_DIR_MODE)


def _make_under(base: Path, parts: tuple[str, ...], owner: RunAs | None) -> None:
    """Create ``base/parts...`` one directory at a time, never following a symlink. Directories
    on the way that are the agent's become 0711; the last one becomes ``owner``'s (0700 when
    new). ``owner=None``: only create."""
    fd = os.open(base, _OPEN_DIR)
    try:
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            created = True
            try:
                os.mkdir(part, PRIVATE_DIR_MODE, dir_fd=fd)
            except FileExistsError:
                created = False
            child = os.open(part, _OPEN_DIR, dir_fd=fd)
            os.close(fd)
            fd = child
            if owner is None:
                continue
            if last:
                os.fchown(fd, owner.uid, owner.gid)
                if created:
                    os.fchmod(fd, PRIVATE_DIR_MODE)
            elif os.fstat(fd).st_uid == os.geteuid():
                os.fchmod(fd, TRAVERSE_MODE)
    finally:
        os.close(fd)
