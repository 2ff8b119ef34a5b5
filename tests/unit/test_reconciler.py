"""plan() as tables: what the reconciler does for a given running and desired state."""

from __future__ import annotations

import dataclasses

import pytest

from agent.reconciler import Action, ActionKind, plan, validate
from margo_stream.errors import DocumentError
from margo_stream.state.spec import (
    ComponentSpec,
    DeploymentSpec,
    FileSpec,
    ProfileType,
    RestartPolicy,
)

START, RESTART, STOP, REMOVE = (
    ActionKind.START,
    ActionKind.RESTART,
    ActionKind.STOP,
    ActionKind.REMOVE,
)
D1 = "sha256:" + "1" * 64
D2 = "sha256:" + "2" * 64


def comp(dep: str, name: str, **kw: object) -> ComponentSpec:
    kw.setdefault("command", ("/bin/app", name))
    return ComponentSpec(deployment_id=dep, name=name, profile=ProfileType.PROCESS, **kw)  # type: ignore[arg-type]


def dep(
    dep_id: str, *components: ComponentSpec, files: tuple[FileSpec, ...] = ()
) -> DeploymentSpec:
    return DeploymentSpec(
        deployment_id=dep_id,
        digest="sha256:" + "0" * 64,
        name=dep_id,
        profile=ProfileType.PROCESS,
        components=components,
        files=files,
    )


A = dep("a", comp("a", "web"), comp("a", "db"))
B = dep("b", comp("b", "job"))


def changed(spec: DeploymentSpec, name: str, **kw: object) -> DeploymentSpec:
    comps = tuple(dataclasses.replace(c, **kw) if c.name == name else c for c in spec.components)
    return dataclasses.replace(spec, components=comps)


def summary(actions: list[Action]) -> list[tuple[str, str, str | None]]:
    return [(a.kind.value, a.deployment_id, a.component) for a in actions]


CASES = [
    # (id, running, desired, expected)
    ("nothing", {}, [], []),
    ("new deployment", {}, [A], [("start", "a", "web"), ("start", "a", "db")]),
    ("identical", {"a": A}, [A], []),
    ("metadata only", {"a": A}, [dataclasses.replace(A, digest=D1, name="renamed")], []),
    (
        "removed deployment",
        {"a": A, "b": B},
        [B],
        [("stop", "a", "web"), ("stop", "a", "db"), ("remove", "a", None)],
    ),
    ("everything removed", {"b": B}, [], [("stop", "b", "job"), ("remove", "b", None)]),
    (
        "env changed",
        {"a": A},
        [changed(A, "web", env=(("X", "2"),))],
        [("restart", "a", "web")],
    ),
    (
        "command changed",
        {"a": A},
        [changed(A, "db", command=("/bin/db2",))],
        [("restart", "a", "db")],
    ),
    (
        "working dir changed",
        {"a": A},
        [changed(A, "web", working_dir="/srv")],
        [("restart", "a", "web")],
    ),
    (
        "restart policy changed",
        {"a": A},
        [changed(A, "web", restart=RestartPolicy.ALWAYS)],
        [("restart", "a", "web")],
    ),
    (
        "properties changed",
        {"a": A},
        [changed(A, "web", properties=(("revision", "2"),))],
        [("restart", "a", "web")],
    ),
    (
        "profile changed",
        {"a": A},
        [changed(A, "web", profile=ProfileType.COMPOSE)],
        [("restart", "a", "web")],
    ),
    (
        "files changed restarts every component",
        {"a": A},
        [dataclasses.replace(A, files=(FileSpec("conf", D1),))],
        [("restart", "a", "web"), ("restart", "a", "db")],
    ),
    (
        "same files in another order",
        {"a": dataclasses.replace(A, files=(FileSpec("x", D1), FileSpec("y", D2)))},
        [dataclasses.replace(A, files=(FileSpec("y", D2), FileSpec("x", D1)))],
        [],
    ),
    (
        "component added",
        {"b": B},
        [dep("b", comp("b", "job"), comp("b", "extra"))],
        [("start", "b", "extra")],
    ),
    ("component removed", {"a": A}, [dep("a", comp("a", "web"))], [("stop", "a", "db")]),
    (
        "component reordered only",
        {"a": A},
        [dep("a", comp("a", "db"), comp("a", "web"))],
        [],
    ),
    (
        "mixed: removal first, then per desired deployment",
        {"a": A, "z": dep("z", comp("z", "old"))},
        [dep("c", comp("c", "new")), changed(A, "web", env=(("X", "1"),))],
        [
            ("stop", "z", "old"),
            ("remove", "z", None),
            ("start", "c", "new"),
            ("restart", "a", "web"),
        ],
    ),
    ("deployment without components", {}, [dep("e")], []),
    ("removing a deployment without components", {"e": dep("e")}, [], [("remove", "e", None)]),
]


@pytest.mark.parametrize(
    ("running", "desired", "expected"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_plan(
    running: dict[str, DeploymentSpec],
    desired: list[DeploymentSpec],
    expected: list[tuple[str, str, str | None]],
) -> None:
    assert summary(plan(running, desired)) == expected


def test_plan_is_idempotent_once_applied() -> None:
    desired = [A, B]
    actions = plan({}, desired)
    assert actions
    assert plan({d.deployment_id: d for d in desired}, desired) == []


def test_start_and_restart_carry_the_desired_spec_and_a_reason() -> None:
    new = changed(A, "web", env=(("X", "2"),))
    (action,) = plan({"a": A}, [new])
    assert action.spec == new.components[0]
    assert action.reason == "env changed"
    (start,) = plan({}, [B])
    assert start.spec == B.components[0] and start.reason == "new deployment"


def test_plan_does_not_mutate_inputs() -> None:
    running = {"a": A}
    desired = [B]
    plan(running, desired)
    assert running == {"a": A} and desired == [B]


@pytest.mark.parametrize(
    "desired",
    [[A, A], [dep("x", comp("x", "c"), comp("x", "c"))]],
    ids=["duplicate deployment", "duplicate component"],
)
def test_plan_refuses_duplicates(desired: list[DeploymentSpec]) -> None:
    with pytest.raises(ValueError):
        plan({}, desired)


@pytest.mark.parametrize(
    "bad",
    [
        dep("../etc", comp("../etc", "c")),
        dep("ok", comp("ok", "a/b")),
        dep("ok", comp("other", "c")),
        dep("ok", files=(FileSpec("../escape", D1),)),
        dep("ok", files=(FileSpec("/abs", D1),)),
        dep(".hidden"),
        dep("ok", comp("ok", "c", working_dir="../../elsewhere")),
    ],
    ids=[
        "dotdot id",
        "slash in component",
        "foreign component",
        "file dotdot",
        "file abs",
        "dot",
        "workdir escapes",
    ],
)
def test_validate_refuses_unsafe_names(bad: DeploymentSpec) -> None:
    with pytest.raises(DocumentError):
        validate([bad])


def test_validate_accepts_nested_file_names() -> None:
    validate([dep("ok-1", comp("ok-1", "c"), files=(FileSpec("conf/app.yaml", D1),))])
