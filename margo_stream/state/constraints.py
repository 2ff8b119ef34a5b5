"""A deployment's ``deviceConstraints`` (Margo rc.3): validated when the document is parsed,
matched against a device's reported capabilities when the controller builds its manifest.

rc.3 (workload-management-api-1.0.0-rc.3.yaml, ``DeviceConstraints``)::

    deviceConstraints:
      capacityRequirements:
        cpu: {cores: 0.5, architectures: [amd64, arm64, arm, riscv64, other]}
        memory: 512Mi            # ^[0-9]+(Mi|Gi|Ki)$
        storage: 1Gi             # ^[0-9]+(Mi|Gi|Ki|Ti|Pi|Ei)$
      eligibilityRules:
        - propertySelector: {matchExpressions: [{key: /otelCollector, operator: In, values: [true]}]}
          labelSelector: {matchExpressions: [{key: site, operator: Exists}]}

Operators: In, NotIn, Exists, DoesNotExist, Gt, Lt (``values`` required for In, NotIn, Gt and
Lt; one number for Gt and Lt), ContainsAll and ContainsAny (``itemSelector`` required). A
property selector's key is a JSON Pointer (RFC 6901) into the capabilities' ``properties``; a
label selector's key is the exact label key.

Matching (what rc.3 leaves open is decided here and stated in the README):

- ``cpu.cores``: the device's cores summed over its ``cpus``; ``architectures``: one of the
  device's cpus has one of them (kernel names such as ``x86_64`` read as rc.3's ``amd64``);
  ``memory``/``storage``: the device's value, in binary units, is at least the requirement.
  A requirement the device does not report is unmet.
- every eligibility rule must hold, and in a rule both selectors; in a selector every
  expression (rc.3: AND semantics).
- ``In``/``NotIn`` compare a scalar with the values (a string value also matches the same
  number or boolean written as a string); ``NotIn`` and ``DoesNotExist`` hold for an absent
  key. ``Gt``/``Lt`` compare numbers, or binary quantities (``"59 Gi"`` Gt ``"4Gi"``).
  ``ContainsAny``: some element of the array satisfies the whole ``itemSelector``;
  ``ContainsAll``: each expression of the ``itemSelector`` is satisfied by some element. The
  item selector's keys are JSON Pointers into the element (``""`` is the element itself). A
  label's value is a string; arrays reported as labels are read split at commas.
- implicit: a deployment of our ``wasm`` profile type needs a device reporting the wasm
  runtime (``capabilities.runs``).

:func:`unmet` gives the first unmet constraint as a sentence naming its field, or None.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict

from margo_stream.state.capabilities import (
    MEMORY_UNITS,
    STORAGE_UNITS,
    architecture,
    parse_quantity,
    runs,
)

ARCHITECTURES = ("amd64", "arm64", "arm", "riscv64", "other")
FIELD = "deviceConstraints"
Path = tuple[str | int, ...]


class ConstraintError(ValueError):
    """A ``deviceConstraints`` breaks rc.3; ``path`` is relative to ``deviceConstraints``."""

    def __init__(self, path: Path, message: str) -> None:
        super().__init__(f"{'.'.join(str(p) for p in (FIELD, *path))}: {message}")
        self.path = path
        self.message = message


class Operator(enum.StrEnum):
    IN = "In"
    NOT_IN = "NotIn"
    EXISTS = "Exists"
    DOES_NOT_EXIST = "DoesNotExist"
    GT = "Gt"
    LT = "Lt"
    CONTAINS_ALL = "ContainsAll"
    CONTAINS_ANY = "ContainsAny"


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class MatchExpression(_Frozen):
    key: str
    operator: Operator
    values: tuple[Any, ...] = ()
    item_selector: Selector | None = None


class Selector(_Frozen):
    expressions: tuple[MatchExpression, ...]


MatchExpression.model_rebuild()


class EligibilityRule(_Frozen):
    property_selector: Selector | None = None
    label_selector: Selector | None = None


class DeviceConstraints(_Frozen):
    cores: float | None = None
    architectures: tuple[str, ...] = ()
    memory: str | None = None
    storage: str | None = None
    rules: tuple[EligibilityRule, ...] = ()


# --------------------------------------------------------------------------- validation


def _mapping(value: Any, path: Path, allowed: tuple[str, ...]) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ConstraintError(path, "expected a mapping")
    for key in value:
        if key not in allowed:
            raise ConstraintError(
                (*path, str(key)), f"unknown field {key!r}; allowed: {', '.join(allowed)}"
            )
    return value


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def _selector(value: Any, path: Path, *, pointer: bool) -> Selector:
    data = _mapping(value, path, ("matchExpressions",))
    if "matchExpressions" not in data:
        raise ConstraintError((*path, "matchExpressions"), "required field is missing")
    items = data["matchExpressions"]
    if not isinstance(items, list):
        raise ConstraintError((*path, "matchExpressions"), "expected a sequence")
    return Selector(
        expressions=tuple(
            _expression(item, (*path, "matchExpressions", i), pointer=pointer)
            for i, item in enumerate(items)
        )
    )


def _expression(value: Any, path: Path, *, pointer: bool) -> MatchExpression:
    data = _mapping(value, path, ("key", "operator", "values", "itemSelector"))
    key = data.get("key")
    if not isinstance(key, str):
        raise ConstraintError((*path, "key"), "required (a string)")
    if pointer and key and not key.startswith("/"):
        raise ConstraintError(
            (*path, "key"), f"{key!r} is not a JSON Pointer (RFC 6901), e.g. /cpus/0/architecture"
        )
    try:
        op = Operator(str(data.get("operator")))
    except ValueError:
        raise ConstraintError(
            (*path, "operator"),
            f"{data.get('operator')!r} is not one of {', '.join(o.value for o in Operator)}",
        ) from None
    values = data.get("values", [])
    if not isinstance(values, list):
        raise ConstraintError((*path, "values"), "expected a sequence")
    if op in (Operator.IN, Operator.NOT_IN, Operator.GT, Operator.LT) and not values:
        raise ConstraintError((*path, "values"), f"required (non-empty) for operator {op.value}")
    if op in (Operator.GT, Operator.LT):
        if len(values) != 1 or (_number(values[0]) is None and _quantity(values[0]) is None):
            raise ConstraintError(
                (*path, "values"), f"{op.value} takes one number (or binary quantity)"
            )
    if any(isinstance(v, dict | list) for v in values):
        raise ConstraintError((*path, "values"), "values must be scalars")
    item = None
    if op in (Operator.CONTAINS_ALL, Operator.CONTAINS_ANY):
        if "itemSelector" not in data:
            raise ConstraintError((*path, "itemSelector"), f"required for operator {op.value}")
        item = _selector(data["itemSelector"], (*path, "itemSelector"), pointer=True)
    elif "itemSelector" in data:
        raise ConstraintError(
            (*path, "itemSelector"), "only for operators ContainsAll and ContainsAny"
        )
    return MatchExpression(key=key, operator=op, values=tuple(values), item_selector=item)


def _capacity(value: Any, out: dict[str, Any]) -> None:
    path: Path = ("capacityRequirements",)
    data = _mapping(value, path, ("cpu", "memory", "storage"))
    if "cpu" in data:
        cpu = _mapping(data["cpu"], (*path, "cpu"), ("cores", "architectures"))
        if "cores" not in cpu:
            raise ConstraintError((*path, "cpu", "cores"), "required field is missing")
        cores = _number(cpu["cores"])
        if cores is None or cores <= 0:
            raise ConstraintError(
                (*path, "cpu", "cores"), f"must be a positive number; got {cpu['cores']!r}"
            )
        out["cores"] = cores
        archs = cpu.get("architectures", [])
        if not isinstance(archs, list):
            raise ConstraintError((*path, "cpu", "architectures"), "expected a sequence")
        for i, arch in enumerate(archs):
            if arch not in ARCHITECTURES:
                raise ConstraintError(
                    (*path, "cpu", "architectures", i),
                    f"{arch!r} is not one of {', '.join(ARCHITECTURES)}",
                )
        out["architectures"] = tuple(archs)
    for key, units in (("memory", MEMORY_UNITS), ("storage", STORAGE_UNITS)):
        if key in data:
            value = data[key]
            ok = isinstance(value, str) and value.strip() == value and " " not in value
            if not ok or parse_quantity(value, units) is None or "." in value:
                raise ConstraintError(
                    (*path, key),
                    f"{value!r} is not an integer in binary units ({'|'.join(units)}), e.g. 512Mi",
                )
            out[key] = value


def validate_constraints(value: Any) -> DeviceConstraints:
    """rc.3 ``DeviceConstraints`` as a typed value, or ``ConstraintError`` naming the field."""
    data = _mapping(value, (), ("capacityRequirements", "eligibilityRules"))
    out: dict[str, Any] = {}
    if "capacityRequirements" in data:
        _capacity(data["capacityRequirements"], out)
    rules = data.get("eligibilityRules", [])
    if not isinstance(rules, list):
        raise ConstraintError(("eligibilityRules",), "expected a sequence")
    parsed = []
    for i, rule in enumerate(rules):
        path: Path = ("eligibilityRules", i)
        rd = _mapping(rule, path, ("propertySelector", "labelSelector"))
        parsed.append(
            EligibilityRule(
                property_selector=_selector(
                    rd["propertySelector"], (*path, "propertySelector"), pointer=True
                )
                if "propertySelector" in rd
                else None,
                label_selector=_selector(
                    rd["labelSelector"], (*path, "labelSelector"), pointer=False
                )
                if "labelSelector" in rd
                else None,
            )
        )
    return DeviceConstraints(rules=tuple(parsed), **out)


# --------------------------------------------------------------------------- matching

_ABSENT = object()


def _quantity(value: Any) -> int | None:
    return parse_quantity(value) if isinstance(value, str) else None


def resolve_pointer(doc: Any, pointer: str) -> Any:
    """The value at RFC 6901 ``pointer`` in ``doc``, or ``_ABSENT``."""
    if pointer == "":
        return doc
    node = doc
    for raw in pointer[1:].split("/"):
        token = raw.replace("~1", "/").replace("~0", "~")
        if isinstance(node, Mapping) and token in node:
            node = node[token]
        elif isinstance(node, list) and token.isdigit() and int(token) < len(node):
            node = node[int(token)]
        else:
            return _ABSENT
    return node


def _equal(value: Any, wanted: Any) -> bool:
    if isinstance(value, dict | list):
        return False
    if value == wanted and type(value) is type(wanted):
        return True
    if isinstance(value, bool) or isinstance(wanted, bool):
        return str(value).lower() == str(wanted).lower()
    a, b = _number(value), _number(wanted)
    if a is not None and b is not None:
        return a == b
    return str(value) == str(wanted)


def _compare(value: Any, bound: Any) -> float | None:
    """value - bound as numbers or binary quantities (None when not comparable)."""
    for conv in (_number, _quantity):
        a, b = conv(value), conv(bound)
        if a is not None and b is not None:
            return float(a) - float(b)
    if isinstance(value, str) and _number(bound) is not None:
        try:
            return float(value) - float(bound)
        except ValueError:
            return None
    return None


def _holds(expr: MatchExpression, value: Any) -> bool:
    op = expr.operator
    if op is Operator.EXISTS:
        return value is not _ABSENT
    if op is Operator.DOES_NOT_EXIST:
        return value is _ABSENT
    if op is Operator.NOT_IN:
        return value is _ABSENT or not any(_equal(value, v) for v in expr.values)
    if value is _ABSENT:
        return False
    if op is Operator.IN:
        return any(_equal(value, v) for v in expr.values)
    if op in (Operator.GT, Operator.LT):
        diff = _compare(value, expr.values[0])
        return diff is not None and (diff > 0 if op is Operator.GT else diff < 0)
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list) or expr.item_selector is None:
        return False
    selector = expr.item_selector
    if op is Operator.CONTAINS_ANY:
        return any(_selector_holds(selector, item) for item in items)
    return all(
        any(_holds(e, resolve_pointer(item, e.key)) for item in items) for e in selector.expressions
    )


def _selector_holds(selector: Selector, doc: Any) -> bool:
    return all(_holds(e, resolve_pointer(doc, e.key)) for e in selector.expressions)


def _describe(expr: MatchExpression) -> str:
    values = f" {list(expr.values)!r}" if expr.values else ""
    return f"{expr.key!r} {expr.operator.value}{values}"


def _capacity_unmet(c: DeviceConstraints, caps: Mapping[str, Any]) -> str | None:
    where = f"{FIELD}.capacityRequirements"
    cpus = [cpu for cpu in caps.get("cpus") or [] if isinstance(cpu, Mapping)]
    if c.cores is not None:
        have = sum(_number(cpu.get("cores")) or 0.0 for cpu in cpus)
        if have < c.cores:
            return f"{where}.cpu.cores: needs {c.cores:g} cores, the device reports {have:g}"
    if c.architectures:
        have_archs = sorted({architecture(cpu.get("architecture")) for cpu in cpus})
        if not set(have_archs) & set(c.architectures):
            return (
                f"{where}.cpu.architectures: needs one of {', '.join(c.architectures)}, the "
                f"device reports {', '.join(have_archs) or 'none'}"
            )
    for key, need in (("memory", c.memory), ("storage", c.storage)):
        if need is None:
            continue
        need_bytes = parse_quantity(need)
        reported = caps.get(key)
        have_bytes = parse_quantity(reported) if isinstance(reported, str) else None
        if have_bytes is None:
            return f"{where}.{key}: needs {need}, the device reports no {key}"
        if need_bytes is not None and have_bytes < need_bytes:
            return f"{where}.{key}: needs {need}, the device reports {reported}"
    return None


def unmet(
    constraints: DeviceConstraints | None,
    profile: str,
    capabilities: Mapping[str, Any],
    labels: Mapping[str, str],
) -> str | None:
    """The first constraint of a deployment (profile type ``profile``) that a device with
    these ``capabilities`` (rc.3 properties) and reported ``labels`` does not satisfy, as a
    sentence naming the field; None when it satisfies them all."""
    if profile == "wasm" and not runs(capabilities, "wasm"):
        return (
            "deploymentProfile.type: wasm needs a device reporting the wasm runtime "
            "(supportedRuntimes), and this device does not"
        )
    if constraints is None:
        return None
    problem = _capacity_unmet(constraints, capabilities)
    if problem is not None:
        return problem
    for i, rule in enumerate(constraints.rules):
        for name, selector, doc in (
            ("propertySelector", rule.property_selector, capabilities),
            ("labelSelector", rule.label_selector, labels),
        ):
            if selector is None:
                continue
            for j, expr in enumerate(selector.expressions):
                value = (
                    resolve_pointer(doc, expr.key)
                    if name == "propertySelector"
                    else doc.get(expr.key, _ABSENT)
                )
                if not _holds(expr, value):
                    return (
                        f"{FIELD}.eligibilityRules[{i}].{name}.matchExpressions[{j}]: "
                        f"{_describe(expr)} does not hold for this device"
                    )
    return None


__all__ = [
    "ARCHITECTURES",
    "ConstraintError",
    "DeviceConstraints",
    "EligibilityRule",
    "MatchExpression",
    "Operator",
    "Selector",
    "resolve_pointer",
    "unmet",
    "validate_constraints",
]
