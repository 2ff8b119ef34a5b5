"""WASI guests for the wasm tests, written as WebAssembly text (no compiler needed), and the
worker that runs them (``agent.runtime.wasm_worker``) run on them in-process, real wasmtime.

PROBE appends one line per argument (after argv[0]) and one per environment entry to the file
named by its second argument (``--out NAME``), creating it in its preopened directory (fd 3,
the guest's ``/``), or to stdout with fewer than two arguments; with ``--fail`` as its first
argument it then exits with status 3. TRAP prints a line and executes ``unreachable``. GROW
grows its memory a page at a time until ``memory.grow`` fails, then traps. SPIN loops forever.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

wasmtime = pytest.importorskip("wasmtime")

from agent.runtime.wasm_worker import outcome  # noqa: E402

# Memory map: 0 argc, 4 argv buffer size, 8 envc, 12 env buffer size, 16 file fd,
# 20 bytes written, 24 iovecs (text, newline), 64 "\n", 1024 argv pointers, 2048 env
# pointers, 4096 argv strings, 20480 env strings.
PROBE = r"""
(module
  (import "wasi_snapshot_preview1" "args_sizes_get" (func $args_sizes_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "args_get" (func $args_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "environ_sizes_get" (func $environ_sizes_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "environ_get" (func $environ_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "path_open" (func $path_open (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $proc_exit (param i32)))
  (memory (export "memory") 2)
  (data (i32.const 64) "\n")
  (func $strlen (param $p i32) (result i32) (local $n i32)
    (block $done (loop $next
      (br_if $done (i32.eqz (i32.load8_u (i32.add (local.get $p) (local.get $n)))))
      (local.set $n (i32.add (local.get $n) (i32.const 1)))
      (br $next)))
    (local.get $n))
  (func $line (param $fd i32) (param $p i32)
    (i32.store (i32.const 24) (local.get $p))
    (i32.store (i32.const 28) (call $strlen (local.get $p)))
    (i32.store (i32.const 32) (i32.const 64))
    (i32.store (i32.const 36) (i32.const 1))
    ;; one iovec a call: WASI may write only the first buffer of several
    (drop (call $fd_write (local.get $fd) (i32.const 24) (i32.const 1) (i32.const 20)))
    (drop (call $fd_write (local.get $fd) (i32.const 32) (i32.const 1) (i32.const 20))))
  (func $arg (param $i i32) (result i32)
    (i32.load (i32.add (i32.const 1024) (i32.mul (local.get $i) (i32.const 4)))))
  (func (export "_start") (local $fd i32) (local $i i32) (local $err i32) (local $p i32)
    (drop (call $args_sizes_get (i32.const 0) (i32.const 4)))
    (drop (call $args_get (i32.const 1024) (i32.const 4096)))
    (drop (call $environ_sizes_get (i32.const 8) (i32.const 12)))
    (drop (call $environ_get (i32.const 2048) (i32.const 20480)))
    (local.set $fd (i32.const 1))
    (if (i32.ge_u (i32.load (i32.const 0)) (i32.const 3))
      (then
        (local.set $p (call $arg (i32.const 2)))
        ;; oflags CREAT, rights: all, fdflags APPEND
        (local.set $err (call $path_open (i32.const 3) (i32.const 0)
          (local.get $p) (call $strlen (local.get $p)) (i32.const 1)
          (i64.const 0x1fffffff) (i64.const 0x1fffffff) (i32.const 1) (i32.const 16)))
        (if (local.get $err) (then (call $proc_exit (i32.add (i32.const 10) (local.get $err)))))
        (local.set $fd (i32.load (i32.const 16)))))
    (local.set $i (i32.const 1))
    (block $done (loop $next
      (br_if $done (i32.ge_u (local.get $i) (i32.load (i32.const 0))))
      (call $line (local.get $fd) (call $arg (local.get $i)))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br $next)))
    (local.set $i (i32.const 0))
    (block $done (loop $next
      (br_if $done (i32.ge_u (local.get $i) (i32.load (i32.const 8))))
      (call $line (local.get $fd)
        (i32.load (i32.add (i32.const 2048) (i32.mul (local.get $i) (i32.const 4)))))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br $next)))
    ;; "--fail" as the first argument: exit 3
    (if (i32.ge_u (i32.load (i32.const 0)) (i32.const 2))
      (then
        (local.set $p (call $arg (i32.const 1)))
        (if (i32.and
              (i32.eq (i32.load (local.get $p)) (i32.const 0x61662d2d))
              (i32.and
                (i32.eq (i32.load16_u (i32.add (local.get $p) (i32.const 4))) (i32.const 0x6c69))
                (i32.eqz (i32.load8_u (i32.add (local.get $p) (i32.const 6))))))
          (then (call $proc_exit (i32.const 3))))))))
"""

TRAP = r"""
(module
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 16) "about to trap\n")
  (func $boom (export "boom") unreachable)
  (func (export "_start")
    (i32.store (i32.const 0) (i32.const 16))
    (i32.store (i32.const 4) (i32.const 14))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))
    (call $boom)))
"""

GROW = r"""
(module
  (memory (export "memory") 1)
  (func (export "_start")
    (loop $more (br_if $more (i32.ne (memory.grow (i32.const 1)) (i32.const -1))))
    unreachable))
"""

SPIN = r"""
(module
  (func (export "_start") (loop $forever (br $forever))))
"""


def wasm_yaml(
    dep: str, component: str, module: str, digest: str, props: str, extra: str = ""
) -> str:
    """A published-form ``wasm`` deployment ``dep`` of one component running ``module`` (a
    deployment file of ``digest``); ``props`` are further property lines, ``extra`` spec keys."""
    return f"""\
apiVersion: application.margo.org/v1alpha1
kind: ApplicationDeployment
metadata:
  annotations: {{applicationId: {dep}, id: {dep}}}
  name: {dep}
  namespace: test
spec:
  deploymentProfile:
    type: wasm
    components:
      - name: {component}
        properties:
          module: {module}
{props}
  files:
    - {{name: {module}, digest: '{digest}'}}
{extra}"""


def run_guest(tmp_path: Path, source: str, **launch: object) -> dict[str, object]:
    """``outcome`` of one run of ``source`` with ``tmp_path/work`` as its ``/``."""
    module = tmp_path / "guest.wat"
    module.write_text(source)
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    full: dict[str, object] = {
        "module": str(module),
        "name": "guest.wat",
        "dir": str(work),
        "args": [],
        "env": {},
        "memory": 16 << 20,
        "fuel": None,
        "result_fd": -1,
    }
    full.update(launch)
    return outcome(full)


def test_probe_writes_args_and_env_to_its_out_file(tmp_path):
    result = run_guest(tmp_path, PROBE, args=["--out", "result.txt", "x y"], env={"SITE_ID": "S-1"})
    assert result == {"kind": "exit", "code": 0}
    lines = (tmp_path / "work" / "result.txt").read_text().splitlines()
    assert lines == ["--out", "result.txt", "x y", "SITE_ID=S-1"]


def test_probe_fail_exits_3_after_appending(tmp_path):
    for _ in range(2):
        result = run_guest(tmp_path, PROBE, args=["--fail", "runs.txt"])
        assert result == {"kind": "exit", "code": 3}
    assert (tmp_path / "work" / "runs.txt").read_text() == "--fail\nruns.txt\n" * 2


def test_probe_cannot_leave_its_directory(tmp_path):
    result = run_guest(tmp_path, PROBE, args=["--out", "../escape.txt"])
    assert result["kind"] == "exit" and result["code"] != 0  # path_open refused: 10 + errno
    assert not (tmp_path / "escape.txt").exists()


def test_trap_reports_the_trap_and_where(tmp_path):
    result = run_guest(tmp_path, TRAP)
    assert result["kind"] == "trap"
    assert "unreachable" in str(result["message"]) and "boom" in str(result["message"])


def test_grow_stops_at_the_memory_limit(tmp_path):
    result = run_guest(tmp_path, GROW, memory=1 << 20)
    assert result["kind"] == "memory", result


def test_initial_memory_over_the_limit(tmp_path):
    big = '(module (memory 64) (func (export "_start")))'  # 4 MiB
    result = run_guest(tmp_path, big, memory=1 << 20)
    assert result["kind"] == "memory", result


def test_spin_runs_out_of_fuel(tmp_path):
    result = run_guest(tmp_path, SPIN, fuel=100_000)
    assert result["kind"] == "fuel" and "fuel" in str(result["message"])


def test_invalid_modules(tmp_path):
    assert run_guest(tmp_path, '(module (func $f (export "nope")))')["kind"] == "invalid"
    result = run_guest(tmp_path, "(module")
    assert result["kind"] == "invalid" and "compile" in str(result["message"])
    missing = {"module": str(tmp_path / "absent.wasm")}
    assert run_guest(tmp_path, SPIN, **missing)["kind"] == "invalid"


def test_worker_main_writes_the_result_to_its_fd(tmp_path, monkeypatch):
    from agent.runtime import wasm_worker

    module = tmp_path / "guest.wat"
    module.write_text(PROBE)
    r, w = os.pipe()
    launch = {
        "module": str(module),
        "name": "guest.wat",
        "dir": str(tmp_path),
        "args": ["--fail"],
        "env": {},
        "memory": 1 << 20,
        "fuel": 10_000_000,
        "result_fd": w,
    }
    monkeypatch.setenv(wasm_worker.LAUNCH_ENV, json.dumps(launch))
    assert wasm_worker.main() == 0
    with os.fdopen(r, "rb") as f:
        assert json.loads(f.read()) == {"kind": "exit", "code": 3}


def test_the_example_counter(tmp_path):
    """examples/wasm-counter.yaml parses, names its module with the right digest, and the
    module counts to 10 into the file its arguments name."""
    from margo_stream.state.digest import sha256_digest
    from margo_stream.state.documents import load_spec

    examples = Path(__file__).resolve().parents[2] / "examples"
    spec = load_spec((examples / "wasm-counter.yaml").read_bytes())
    (ref,) = spec.files
    module = examples / ref.name
    assert sha256_digest(module.read_bytes()) == ref.digest, "update the digest in the example"
    (comp,) = spec.components
    assert comp.command[0] == ref.name
    result = run_guest(tmp_path, module.read_text(), args=list(comp.command[1:]))
    assert result == {"kind": "exit", "code": 0}
    assert (tmp_path / "work" / "result.txt").read_text() == "".join(f"{n}\n" for n in range(1, 11))
