"""The process one run of a wasm component lives in: ``python -P -m agent.runtime.wasm_worker``.

The agent (``agent.runtime.wasm``) starts it with the run's description as JSON in the
environment variable ``MARGO_WASM_LAUNCH`` (the environment, unlike the command line, is
readable by the worker's own user only; parameters may be secrets)::

    {"module": "/abs/path/counter.wat", "name": "counter.wat", "dir": "/abs/work/dir",
     "args": [...], "env": {...}, "memory": 67108864, "fuel": null, "result_fd": 3}

It compiles the module (binary or text format), links WASI preview 1 with ``dir`` preopened as
``/``, the guest's stdout and stderr on the worker's own (the pipe the agent logs), stdin
empty, sets the memory limit and the fuel, and calls ``_start``. How the run ended goes to
``result_fd`` as one JSON object, :func:`outcome`'s, then the worker exits 0: the guest's exit
status is in the result, not in the worker's. A worker that dies before writing one (killed,
crashed) is reported by the agent from its exit status.

Only the standard library and wasmtime are imported, so a run starts in about 0.15 s.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

LAUNCH_ENV = "MARGO_WASM_LAUNCH"
PAGE = 65536


def _cause(exc: BaseException) -> str:
    """The reason in a wasmtime error: the text after its last ``Caused by:``."""
    text = str(exc).strip()
    if "Caused by:" in text:
        text = text.rsplit("Caused by:", 1)[1].strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return " ".join(lines)[:500] or type(exc).__name__


def _where(trap: Any) -> str:
    frames = getattr(trap, "frames", None) or []
    if not frames:
        return ""
    top = frames[0]
    func = top.func_name or f"wasm function {top.func_index}"
    return f" (in {func}, module offset {top.module_offset:#x})"


def _memory_full(store: Any, instance: Any, limit: int) -> bool:
    """True when a memory of the guest is within one page of ``limit`` (a grow was refused)."""
    import wasmtime

    if instance is None:
        return False
    for _name, item in instance.exports(store).items():
        if isinstance(item, wasmtime.Memory) and item.data_len(store) + PAGE > limit:
            return True
    return False


def outcome(launch: dict[str, Any]) -> dict[str, Any]:
    """Run the guest; how it ended: ``{"kind": "exit", "code": N}``, or ``{"kind": K,
    "message": ...}`` with K one of ``trap``, ``fuel``, ``memory`` (the limit stopped it) and
    ``invalid`` (the module cannot be compiled, linked or started)."""
    import wasmtime

    memory_limit = int(launch["memory"])
    fuel = launch.get("fuel")
    config = wasmtime.Config()
    config.consume_fuel = fuel is not None
    engine = wasmtime.Engine(config)
    store = wasmtime.Store(engine)
    store.set_limits(memory_size=memory_limit)
    if fuel is not None:
        store.set_fuel(int(fuel))
    wasi = wasmtime.WasiConfig()
    wasi.argv = [launch["name"], *launch["args"]]
    wasi.env = sorted(launch["env"].items())
    wasi.inherit_stdout()
    wasi.inherit_stderr()
    wasi.preopen_dir(launch["dir"], "/")
    store.set_wasi(wasi)
    linker = wasmtime.Linker(engine)
    linker.define_wasi()
    try:
        with open(launch["module"], "rb") as f:
            module = wasmtime.Module(engine, f.read())
    except OSError as exc:
        return {"kind": "invalid", "message": f"cannot read the module: {exc.strerror or exc}"}
    except wasmtime.WasmtimeError as exc:
        return {"kind": "invalid", "message": f"cannot compile the module: {_cause(exc)}"}
    instance = None
    try:
        instance = linker.instantiate(store, module)
        start = instance.exports(store).get("_start")
        if not isinstance(start, wasmtime.Func):
            return {
                "kind": "invalid",
                "message": "the module exports no _start function (a WASI command)",
            }
        start(store)
    except wasmtime.ExitTrap as exc:
        code = exc.code
        if code != 0 and _memory_full(store, instance, memory_limit):
            return {"kind": "memory", "message": f"exited with status {code}", "code": code}
        return {"kind": "exit", "code": code}
    except wasmtime.Trap as exc:
        message = _cause(exc) + _where(exc)
        if exc.trap_code == wasmtime.TrapCode.OUT_OF_FUEL:
            return {"kind": "fuel", "message": message}
        if _memory_full(store, instance, memory_limit):
            return {"kind": "memory", "message": message}
        return {"kind": "trap", "message": message}
    except wasmtime.WasmtimeError as exc:
        message = _cause(exc)
        if instance is None:
            kind = "memory" if "memory" in message and "limit" in message else "invalid"
            return {"kind": kind, "message": f"cannot instantiate the module: {message}"}
        return {"kind": "trap", "message": message}
    return {"kind": "exit", "code": 0}


def main() -> int:
    launch = json.loads(os.environ.pop(LAUNCH_ENV))
    result_fd = int(launch["result_fd"])
    try:
        result = outcome(launch)
    except Exception as exc:  # noqa: BLE001 - reported to the agent, which names the component
        result = {"kind": "invalid", "message": f"{type(exc).__name__}: {exc}"[:500]}
    sys.stdout.flush()
    data = json.dumps(result).encode()
    view = memoryview(data)
    while view:
        view = view[os.write(result_fd, view) :]
    os.close(result_fd)
    return 0


if __name__ == "__main__":
    sys.exit(main())
