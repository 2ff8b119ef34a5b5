"""Margo rc.3 device capabilities: validation, quantities, and the normalised view matched
against a deployment's ``deviceConstraints`` (``constraints.py``).

rc.3 (workload-management-api-1.0.0-rc.3.yaml, ``DeviceCapabilitiesManifest``; prose in
device-capabilities.md) wraps the fields in ``properties`` next to optional ``labels`` and
``x-<name>-extensions`` objects, nothing else. Inside ``properties``: ``id`` (a ``DeviceId``),
``vendor``, ``modelNumber`` and ``serialNumber`` are required strings; a device that hosts
workloads also reports ``cpus`` (each with a numeric ``cores``, optional ``architecture`` of
amd64 | arm64 | arm), ``memory`` (binary units Ki/Mi/Gi, e.g. ``"59 Gi"``), ``storage`` (also
Ti/Pi/Ei), ``peripherals`` (type gpu | display | camera | microphone | speaker),
``interfaces`` (ethernet | wifi | cellular | bluetooth | usb | canbus | rs232),
``otelCollector`` (a boolean), ``supportedRuntimes`` (>= 1 of oci | custom) and
``supportedDeploymentTypes`` (>= 1 of helm | compose | custom). A see-thru gateway that hosts
nothing reports only the identity fields.

Every failure is a :class:`CapabilityError` naming the field (``properties.cpus[0].cores``), so
the device API answers 422 with that field in ``errors``.

Our agents report over QUIC in the same field names but describe the machine as the kernel
does (``x86_64``, runtime ``process``); :func:`architecture` maps the kernel's names onto
rc.3's for matching, and :func:`runs` says whether a device reports a runtime, in rc.3's
``custom`` value plus an ``x-<name>-extensions`` object listing it, or by name.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

ARCHITECTURES = ("amd64", "arm64", "arm")
PERIPHERAL_TYPES = ("gpu", "display", "camera", "microphone", "speaker")
INTERFACE_TYPES = ("ethernet", "wifi", "cellular", "bluetooth", "usb", "canbus", "rs232")
RUNTIMES = ("oci", "custom")
DEPLOYMENT_TYPES = ("helm", "compose", "custom")
DEVICE_ID_RE = re.compile(r"[A-Za-z0-9._~-]+(/[A-Za-z0-9._~-]+)*")
EXTENSION_RE = re.compile(r"x-[a-z][a-z0-9-]*-extensions")
# rc.3's schema closes the document to properties, labels and extensions, but its prose
# (device-capabilities.md) requires this envelope and its example sends it: accepted when it
# has exactly these values, and not stored (a documented deviation, README)
ENVELOPE = {"apiVersion": "device.margo.org/v1alpha1", "kind": "DeviceCapabilitiesManifest"}

_UNITS = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40, "Pi": 1 << 50, "Ei": 1 << 60}
MEMORY_UNITS = ("Ki", "Mi", "Gi")
STORAGE_UNITS = ("Ki", "Mi", "Gi", "Ti", "Pi", "Ei")
_QUANTITY_RE = re.compile(r"(\d+(?:\.\d+)?) ?([KMGTPE]i)")
# the kernel's machine names (platform.machine()) that name an rc.3 architecture
_KERNEL_ARCH = {
    "x86_64": "amd64",
    "amd64": "amd64",
    "aarch64": "arm64",
    "arm64": "arm64",
    "armv7l": "arm",
    "armv6l": "arm",
    "armhf": "arm",
    "arm": "arm",
    "riscv64": "riscv64",
}


class CapabilityError(ValueError):
    """One field of a capabilities document breaks rc.3."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def parse_quantity(value: str, units: tuple[str, ...] = STORAGE_UNITS) -> int | None:
    """Bytes of a binary quantity (``"59 Gi"``, ``"512Mi"``), None when it is not one."""
    m = _QUANTITY_RE.fullmatch(value.strip()) if isinstance(value, str) else None
    if m is None or m.group(2) not in units:
        return None
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def architecture(value: object) -> str:
    """rc.3's name for a reported architecture (kernel names mapped), ``other`` if none."""
    if not isinstance(value, str):
        return "other"
    return _KERNEL_ARCH.get(value.lower(), "other")


def _string(props: Mapping[str, Any], key: str, *, required: bool = False) -> None:
    if key not in props:
        if required:
            raise CapabilityError(f"properties.{key}", "is required (a string)")
        return
    if not isinstance(props[key], str):
        raise CapabilityError(f"properties.{key}", "must be a string")


def _quantity(props: Mapping[str, Any], key: str, units: tuple[str, ...]) -> None:
    if key not in props:
        return
    value = props[key]
    if not isinstance(value, str) or parse_quantity(value, units) is None:
        raise CapabilityError(
            f"properties.{key}",
            f'must be a string in binary units ({", ".join(units)}), e.g. "4 Gi"; got {value!r}',
        )


def _typed_list(props: Mapping[str, Any], key: str, allowed: tuple[str, ...]) -> None:
    if key not in props:
        return
    items = props[key]
    if not isinstance(items, list):
        raise CapabilityError(f"properties.{key}", "must be an array")
    for i, item in enumerate(items):
        where = f"properties.{key}[{i}]"
        if not isinstance(item, dict):
            raise CapabilityError(where, "must be an object with a type")
        if item.get("type") not in allowed:
            raise CapabilityError(
                f"{where}.type", f"must be one of {', '.join(allowed)}; got {item.get('type')!r}"
            )
        for extra in ("manufacturer", "model"):
            if extra in item and not isinstance(item[extra], str):
                raise CapabilityError(f"{where}.{extra}", "must be a string")


def _enum_list(props: Mapping[str, Any], key: str, allowed: tuple[str, ...]) -> None:
    if key not in props:
        return
    items = props[key]
    if not isinstance(items, list) or not items:
        raise CapabilityError(
            f"properties.{key}", f"must be a non-empty array of {', '.join(allowed)}"
        )
    for i, item in enumerate(items):
        if item not in allowed:
            raise CapabilityError(
                f"properties.{key}[{i}]", f"must be one of {', '.join(allowed)}; got {item!r}"
            )


def _cpus(props: Mapping[str, Any]) -> None:
    if "cpus" not in props:
        return
    cpus = props["cpus"]
    if not isinstance(cpus, list):
        raise CapabilityError("properties.cpus", "must be an array of {cores, architecture}")
    for i, cpu in enumerate(cpus):
        where = f"properties.cpus[{i}]"
        if not isinstance(cpu, dict):
            raise CapabilityError(where, "must be an object {cores, architecture}")
        cores = cpu.get("cores")
        if "cores" not in cpu:
            raise CapabilityError(f"{where}.cores", "is required (a number)")
        if (
            isinstance(cores, bool)
            or not isinstance(cores, int | float)
            or not math.isfinite(cores)
            or cores <= 0
        ):
            raise CapabilityError(f"{where}.cores", f"must be a positive number; got {cores!r}")
        if "architecture" in cpu and cpu["architecture"] not in ARCHITECTURES:
            raise CapabilityError(
                f"{where}.architecture",
                f"must be one of {', '.join(ARCHITECTURES)}; got {cpu['architecture']!r}",
            )


def validate_properties(props: Any) -> dict[str, Any]:
    """rc.3's ``DeviceCapabilitiesManifest.properties``: a copy, or ``CapabilityError``."""
    if not isinstance(props, dict):
        raise CapabilityError("properties", "is required (an object)")
    for key in ("id", "vendor", "modelNumber", "serialNumber"):
        _string(props, key, required=True)
    if not DEVICE_ID_RE.fullmatch(props["id"]):
        raise CapabilityError("properties.id", f"{props['id'][:80]!r} is not a Margo DeviceId")
    _cpus(props)
    _quantity(props, "memory", MEMORY_UNITS)
    _quantity(props, "storage", STORAGE_UNITS)
    _typed_list(props, "peripherals", PERIPHERAL_TYPES)
    _typed_list(props, "interfaces", INTERFACE_TYPES)
    if "otelCollector" in props and not isinstance(props["otelCollector"], bool):
        raise CapabilityError(
            "properties.otelCollector", f"must be a boolean; got {props['otelCollector']!r}"
        )
    _enum_list(props, "supportedRuntimes", RUNTIMES)
    _enum_list(props, "supportedDeploymentTypes", DEPLOYMENT_TYPES)
    return dict(props)


def validate_labels(labels: Any) -> dict[str, str]:
    """rc.3 ``labels`` (string, number, boolean, or an array of strings or of numbers) as the
    string labels selectors read (arrays joined with commas)."""
    if not isinstance(labels, dict):
        raise CapabilityError("labels", "must be an object")
    out: dict[str, str] = {}
    for key, value in labels.items():
        if isinstance(value, bool):
            out[key] = "true" if value else "false"
        elif isinstance(value, str | int | float):
            out[key] = str(value)
        elif isinstance(value, list) and (
            all(isinstance(v, str) for v in value)
            or all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
        ):
            out[key] = ",".join(str(v) for v in value)
        else:
            raise CapabilityError(
                f"labels.{key}",
                "must be a string, number, boolean, or an array of strings or of numbers",
            )
    return out


def validate_document(doc: Any) -> tuple[dict[str, Any], dict[str, str]]:
    """A whole ``DeviceCapabilitiesManifest`` -> (stored capabilities, reported labels).

    The stored capabilities are the properties plus each ``x-<name>-extensions`` object under
    its own key (how a device names a ``custom`` runtime, see :func:`runs`)."""
    if not isinstance(doc, dict):
        raise CapabilityError("(body)", "must be a JSON object")
    for key, want in ENVELOPE.items():  # device-capabilities.md's envelope, see ENVELOPE
        if key in doc and doc[key] != want:
            raise CapabilityError(key, f"must be {want!r}; got {doc[key]!r}")
    for key in doc:
        if key in ("properties", "labels", *ENVELOPE):
            continue
        if not (isinstance(key, str) and EXTENSION_RE.fullmatch(key)):
            raise CapabilityError(
                str(key), "is not allowed (rc.3: properties, labels, x-<name>-extensions)"
            )
        if not isinstance(doc[key], dict):
            raise CapabilityError(str(key), "must be an object")
    if "properties" not in doc:
        raise CapabilityError("properties", "is required (an object)")
    props = validate_properties(doc["properties"])
    labels = validate_labels(doc.get("labels", {}))
    for key, value in doc.items():
        if key not in ("properties", "labels", *ENVELOPE):
            props[key] = value
    return props, labels


def _names(value: object) -> set[str]:
    if isinstance(value, str):
        return {value.lower()}
    if isinstance(value, list):
        return {v.lower() for v in value if isinstance(v, str)}
    return set()


def runs(capabilities: Mapping[str, Any], runtime: str) -> bool:
    """Whether the device reports ``runtime`` (e.g. ``wasm``): by name in
    ``supportedRuntimes``/``supportedDeploymentTypes``, or as rc.3's ``custom`` value with an
    ``x-<name>-extensions`` object naming it (in ``runtimes``, ``supportedRuntimes``,
    ``deploymentTypes`` or ``supportedDeploymentTypes``)."""
    runtime = runtime.lower()
    declared = _names(capabilities.get("supportedRuntimes")) | _names(
        capabilities.get("supportedDeploymentTypes")
    )
    if runtime in declared:
        return True
    if "custom" not in declared:
        return False
    for key, ext in capabilities.items():
        if isinstance(key, str) and EXTENSION_RE.fullmatch(key) and isinstance(ext, Mapping):
            for field in ("runtimes", "supportedRuntimes", "deploymentTypes"):
                if runtime in _names(ext.get(field)):
                    return True
            if runtime in _names(ext.get("supportedDeploymentTypes")):
                return True
    return False


__all__ = [
    "ARCHITECTURES",
    "DEPLOYMENT_TYPES",
    "INTERFACE_TYPES",
    "MEMORY_UNITS",
    "PERIPHERAL_TYPES",
    "RUNTIMES",
    "STORAGE_UNITS",
    "CapabilityError",
    "architecture",
    "parse_quantity",
    "runs",
    "validate_document",
    "validate_labels",
    "validate_properties",
]
