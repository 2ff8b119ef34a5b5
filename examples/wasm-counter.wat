;; A WASI command in WebAssembly text format (the agent's wasmtime compiles it as it is):
;; `counter --out NAME` writes the numbers 1 to 10, one a line, to NAME in its directory
;; (the component's working directory, its `/`), then says so on stdout (the component's log).
(module
  (import "wasi_snapshot_preview1" "args_sizes_get" (func $args_sizes_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "args_get" (func $args_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "path_open" (func $path_open (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $proc_exit (param i32)))
  ;; 0 argc, 4 size of the arguments, 16 the file's fd, 20 bytes written, 24 an iovec,
  ;; 64 one line of text, 128 messages, 1024 argument pointers, 4096 argument strings
  (memory (export "memory") 1)
  (data (i32.const 128) "counter: counted to 10\n")
  (data (i32.const 160) "usage: counter --out NAME\n")
  (func $write (param $fd i32) (param $p i32) (param $len i32)
    (i32.store (i32.const 24) (local.get $p))
    (i32.store (i32.const 28) (local.get $len))
    (drop (call $fd_write (local.get $fd) (i32.const 24) (i32.const 1) (i32.const 20))))
  (func $strlen (param $p i32) (result i32) (local $n i32)
    (block $done (loop $next
      (br_if $done (i32.eqz (i32.load8_u (i32.add (local.get $p) (local.get $n)))))
      (local.set $n (i32.add (local.get $n) (i32.const 1)))
      (br $next)))
    (local.get $n))
  ;; the decimal digits of $n (0 to 99) and a newline
  (func $number (param $fd i32) (param $n i32) (local $len i32)
    (if (i32.ge_u (local.get $n) (i32.const 10))
      (then
        (i32.store8 (i32.const 64) (i32.add (i32.const 48) (i32.div_u (local.get $n) (i32.const 10))))
        (local.set $len (i32.const 1))))
    (i32.store8 (i32.add (i32.const 64) (local.get $len))
      (i32.add (i32.const 48) (i32.rem_u (local.get $n) (i32.const 10))))
    (i32.store8 (i32.add (i32.const 65) (local.get $len)) (i32.const 10))
    (call $write (local.get $fd) (i32.const 64) (i32.add (local.get $len) (i32.const 2))))
  (func (export "_start") (local $name i32) (local $n i32)
    (drop (call $args_sizes_get (i32.const 0) (i32.const 4)))
    (drop (call $args_get (i32.const 1024) (i32.const 4096)))
    (if (i32.lt_u (i32.load (i32.const 0)) (i32.const 3))
      (then
        (call $write (i32.const 2) (i32.const 160) (i32.const 26))
        (call $proc_exit (i32.const 2))))
    (local.set $name (i32.load (i32.const 1032)))  ;; argv[2]
    ;; fd 3 is the preopened `/`; oflags CREAT|TRUNC
    (if (call $path_open (i32.const 3) (i32.const 0) (local.get $name) (call $strlen (local.get $name))
          (i32.const 9) (i64.const 0x1fffffff) (i64.const 0x1fffffff) (i32.const 0) (i32.const 16))
      (then (call $proc_exit (i32.const 1))))
    (local.set $n (i32.const 1))
    (loop $next
      (call $number (i32.load (i32.const 16)) (local.get $n))
      (local.set $n (i32.add (local.get $n) (i32.const 1)))
      (br_if $next (i32.le_u (local.get $n) (i32.const 10))))
    (call $write (i32.const 1) (i32.const 128) (i32.const 23))))
