"""What every margo-stream command shares: running on uvloop, signals, one-line errors."""

from __future__ import annotations

import signal
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import anyio

from margo_stream.errors import MargoError
from margo_stream.gcpolicy import gc_policy_running


def fail(prog: str, message: str, code: int = 2) -> int:
    print(f"{prog}: error: {message}", file=sys.stderr)
    return code


def run_service(
    prog: str,
    main: Callable[[], Awaitable[Any]],
    on_signal: Callable[[], None],
    on_reload: Callable[[], None] | None = None,
) -> int:
    """Run ``main`` on uvloop until it returns; SIGTERM/SIGINT call ``on_signal`` (a clean stop)
    and, when ``on_reload`` is given, SIGHUP calls it (re-read configuration, no restart)."""
    wanted = [signal.SIGTERM, signal.SIGINT] + ([signal.SIGHUP] if on_reload else [])

    async def runner() -> None:
        async with gc_policy_running(), anyio.create_task_group() as tg:

            async def signals() -> None:
                with anyio.open_signal_receiver(*wanted) as received:
                    async for signum in received:
                        if signum == signal.SIGHUP and on_reload is not None:
                            on_reload()
                        else:
                            on_signal()

            tg.start_soon(signals)
            await main()
            tg.cancel_scope.cancel()

    # Worker threads (SQLite, fsyncs) would otherwise hold the GIL in 5 ms slices while the
    # event loop waits: a shorter interval keeps interactive work (pushes, keystrokes) prompt.
    sys.setswitchinterval(0.0005)
    try:
        anyio.run(runner, backend="asyncio", backend_options={"use_uvloop": True})
    except BaseException as exc:  # noqa: BLE001 - task groups wrap errors in groups
        errors = _margo_errors(exc)
        if errors:
            return fail(prog, "; ".join(str(e) for e in errors))
        if isinstance(exc, KeyboardInterrupt):
            return 130
        raise
    return 0


def _margo_errors(exc: BaseException) -> list[MargoError]:
    if isinstance(exc, MargoError):
        return [exc]
    if isinstance(exc, BaseExceptionGroup):
        found: list[MargoError] = []
        for inner in exc.exceptions:
            found.extend(_margo_errors(inner))
        return found
    return []
