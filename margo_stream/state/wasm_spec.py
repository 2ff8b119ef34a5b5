"""The ``wasm`` deployment profile (ours, like ``process``): a WASI module run by the agent.

A component's properties::

    module: counter.wasm      # required: one of the deployment's files (spec.files or
                              # spec.x-margo-stream-extensions.files), .wasm or .wat
    args: [--out, result.txt] # the guest's arguments (its argv[0] is the module's name)
    env: {GREETING: hello}    # its environment; parameters add to it with ENV.<NAME> pointers
    restart: never            # always | on-failure (default) | never, as for process
    memoryLimit: 64Mi         # bytes (an integer) or <n>Ki / <n>Mi / <n>Gi
    fuel: 5000000000          # wasmtime fuel (about one unit per instruction); none by default
    timeout: 10m              # wall time of one run: seconds, or 1h30m / 8m30s / 45s; none by default

Limits (:class:`WasmLimits`): ``memoryLimit`` bounds every linear memory of the guest
(default 64 MiB, at most 4 GiB, the whole 32-bit address space; a ``memory.grow`` past it
fails). ``fuel`` bounds the instructions one run may execute (1 to 10^15). ``timeout`` bounds
the wall time of one run (up to 7 days). Fuel and wall time are unlimited by default because
a component may be a service that runs until it is stopped, as a ``process`` one may; give
them to a job.

How it maps onto :class:`~margo_stream.state.spec.ComponentSpec`: ``command`` is the module
followed by the arguments, ``env`` and ``restart`` as for ``process``, and ``properties``
carries the limits that were given, normalised (``memoryLimit`` in bytes, ``fuel``,
``timeout`` in seconds). The working directory is always the component's own
(``STATE/work/<deployment>/<component>/``), which the guest sees as ``/``.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypedDict

from pydantic import BaseModel, ConfigDict

from margo_stream.state.content_rules import validate_file_name
from margo_stream.state.document_schema import check_keys, validate_model
from margo_stream.state.spec import RestartPolicy
from margo_stream.state.yaml_nodes import NodeContext, NodePath, show

PROPERTIES = ("module", "args", "env", "restart", "memoryLimit", "fuel", "timeout")
MODULE_SUFFIXES = (".wasm", ".wat")
PAGE = 65536  # a WebAssembly page

DEFAULT_MEMORY = 64 << 20
MIN_MEMORY = PAGE
MAX_MEMORY = 4 << 30
MAX_FUEL = 10**15
MAX_TIMEOUT = 7 * 24 * 3600.0
MAX_ARGS_BYTES = 64 * 1024  # arguments and environment, each

_ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_SIZE_RE = re.compile(r"(\d+)\s*(Ki|Mi|Gi)?")
_UNITS = {None: 1, "Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30}
_DURATION_RE = re.compile(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+(?:\.\d+)?)s)?")


class RawWasm(BaseModel):
    """The wire shape of a wasm component's properties (strict; unknown keys reported)."""

    model_config = ConfigDict(strict=True, extra="allow")

    module: str
    args: list[str] | None = None
    env: dict[str, str | bool | int | float] | None = None
    restart: str | None = None
    memoryLimit: str | int | None = None
    fuel: int | None = None
    timeout: str | int | float | None = None


@dataclass(frozen=True, slots=True)
class WasmLimits:
    """What one run of a wasm component may use."""

    memory: int = DEFAULT_MEMORY  # bytes, for each linear memory
    fuel: int | None = None  # None: unlimited
    timeout: float | None = None  # seconds of wall time per run; None: unlimited

    def to_properties(self) -> tuple[tuple[str, str], ...]:
        """The normalised ``properties`` of a ComponentSpec (sorted, as the others are)."""
        out = {"memoryLimit": str(self.memory)}
        if self.fuel is not None:
            out["fuel"] = str(self.fuel)
        if self.timeout is not None:
            out["timeout"] = format(self.timeout, "g")
        return tuple(sorted(out.items()))

    @classmethod
    def from_properties(cls, properties: Mapping[str, str]) -> WasmLimits:
        """The limits of a resolved component (``ValueError`` if a value is out of range)."""
        memory = parse_memory(properties.get("memoryLimit", str(DEFAULT_MEMORY)))
        fuel = properties.get("fuel")
        timeout = properties.get("timeout")
        return cls(
            memory=memory,
            fuel=None if fuel is None else parse_fuel(int(fuel)),
            timeout=None if timeout is None else parse_timeout(float(timeout)),
        )


class WasmFields(TypedDict):
    """The fields of a ``documents.Component`` for a wasm component (besides its name)."""

    command: tuple[str, ...]
    env: tuple[tuple[str, str], ...]
    restart: RestartPolicy
    properties: tuple[tuple[str, str], ...]


def parse_memory(value: str | int) -> int:
    """``memoryLimit`` in bytes: an integer or ``<n>Ki|Mi|Gi``; ``ValueError`` otherwise."""
    if isinstance(value, bool):
        raise ValueError("memoryLimit must be a size such as 64Mi, not a boolean")
    if isinstance(value, int):
        size = value
    else:
        m = _SIZE_RE.fullmatch(value.strip())
        if m is None:
            raise ValueError(f"memoryLimit {value!r} must be bytes or <n>Ki, <n>Mi, <n>Gi")
        size = int(m.group(1)) * _UNITS[m.group(2)]
    if not MIN_MEMORY <= size <= MAX_MEMORY:
        raise ValueError(
            f"memoryLimit {value!r} is out of range: 64Ki (one page) to 4Gi (a 32-bit memory)"
        )
    return size


def parse_fuel(value: int) -> int:
    if isinstance(value, bool) or not 1 <= value <= MAX_FUEL:
        raise ValueError(f"fuel {value!r} must be an integer from 1 to 10^15")
    return value


def parse_timeout(value: str | int | float) -> float:
    """``timeout`` in seconds: a number or ``1h30m``, ``8m30s``, ``45s``."""
    if isinstance(value, bool):
        raise ValueError("timeout must be a duration such as 30s, not a boolean")
    if isinstance(value, str):
        m = _DURATION_RE.fullmatch(value.strip())
        if m is None or not any(m.groups()):
            raise ValueError(f"timeout {value!r} must be seconds or look like 1h30m, 8m30s, 45s")
        h, mins, s = m.groups()
        seconds = int(h or 0) * 3600 + int(mins or 0) * 60 + float(s or 0)
    else:
        seconds = float(value)
    if not 0 < seconds <= MAX_TIMEOUT:
        raise ValueError(f"timeout {value!r} must be more than 0 s and at most 7 days")
    return seconds


def module_problem(module: str) -> str | None:
    """What is wrong with a ``module`` file name, or None."""
    try:
        validate_file_name(module)
    except ValueError as exc:
        return str(exc)
    if not module.endswith(MODULE_SUFFIXES):
        return f"module {module!r} must be a .wasm (binary) or .wat (text) file"
    return None


def _strings_problem(values: Sequence[str], what: str) -> str | None:
    if any("\x00" in v for v in values):
        return f"{what} must not contain NUL characters"
    if sum(len(v.encode()) + 1 for v in values) > MAX_ARGS_BYTES:
        return f"{what} are too long: at most {MAX_ARGS_BYTES // 1024} KiB in all"
    return None


def _env_value(value: str | bool | int | float) -> str:
    """An ``env`` value as the guest sees it (as ``documents.stringify`` does for process)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def wasm_component(ctx: NodeContext, ppath: NodePath, props: Mapping[str, Any]) -> WasmFields:
    """Validate a wasm component's ``properties`` (at ``ppath``); raise a located
    ``DocumentError``."""
    raw: RawWasm = validate_model(RawWasm, props, ctx, ppath)
    check_keys(ctx, ppath, props, PROPERTIES)
    problem = module_problem(raw.module)
    if problem:
        raise ctx.error(ppath + ("module",), problem)
    args = tuple(raw.args or ())
    problem = _strings_problem(args, "args")
    if problem:
        raise ctx.error(ppath + ("args",), problem)
    env: dict[str, str] = {}
    for key, value in (raw.env or {}).items():
        if not _ENV_NAME_RE.fullmatch(key):
            raise ctx.error(ppath + ("env", key), f"invalid environment variable name {key!r}")
        env[key] = _env_value(value)
    problem = _strings_problem([f"{k}={v}" for k, v in env.items()], "env entries")
    if problem:
        raise ctx.error(ppath + ("env",), problem)
    try:
        restart = RestartPolicy(raw.restart or RestartPolicy.ON_FAILURE)
    except ValueError:
        allowed = ", ".join(p.value for p in RestartPolicy)
        raise ctx.error(
            ppath + ("restart",), f"restart {show(raw.restart)} is not one of: {allowed}"
        ) from None
    try:
        memory = DEFAULT_MEMORY if raw.memoryLimit is None else parse_memory(raw.memoryLimit)
    except ValueError as exc:
        raise ctx.error(ppath + ("memoryLimit",), str(exc)) from None
    try:
        fuel = None if raw.fuel is None else parse_fuel(raw.fuel)
    except ValueError as exc:
        raise ctx.error(ppath + ("fuel",), str(exc)) from None
    try:
        timeout = None if raw.timeout is None else parse_timeout(raw.timeout)
    except ValueError as exc:
        raise ctx.error(ppath + ("timeout",), str(exc)) from None
    limits = WasmLimits(memory=memory, fuel=fuel, timeout=timeout)
    return WasmFields(
        command=(raw.module, *args),
        env=tuple(sorted(env.items())),
        restart=restart,
        properties=limits.to_properties(),
    )


class _Named(Protocol):
    @property
    def name(self) -> str: ...


class _Commanded(Protocol):
    @property
    def command(self) -> tuple[str, ...]: ...


def check_modules(
    ctx: NodeContext,
    prof_path: NodePath,
    components: Sequence[_Commanded],
    files: Collection[_Named],
) -> None:
    """Every wasm component's module must be one of the deployment's files."""
    names = {f.name for f in files}
    for i, comp in enumerate(components):
        module = comp.command[0]
        if module not in names:
            listed = ", ".join(sorted(names)) or "none"
            raise ctx.error(
                prof_path + ("components", i, "properties", "module"),
                f"module {module!r} is not one of the deployment's files ({listed}); list it "
                "in spec.files (or spec.x-margo-stream-extensions.files) with its digest",
            )


__all__ = [
    "DEFAULT_MEMORY",
    "MAX_FUEL",
    "MAX_MEMORY",
    "MAX_TIMEOUT",
    "PROPERTIES",
    "WasmFields",
    "WasmLimits",
    "check_modules",
    "module_problem",
    "parse_fuel",
    "parse_memory",
    "parse_timeout",
    "wasm_component",
]
