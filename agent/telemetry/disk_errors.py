"""Plain words for the disk errors the telemetry buffer meets (for its errors and logs)."""

from __future__ import annotations

import errno


def describe_oserror(exc: OSError) -> str:
    """``exc`` as a short phrase naming its errno, e.g. ``disk full (ENOSPC)``."""
    if exc.errno == errno.ENOSPC:
        return "disk full (ENOSPC)"
    if exc.errno == errno.EFBIG:
        return "file size limit exceeded (EFBIG)"
    if exc.errno == errno.EDQUOT:
        return "disk quota exceeded (EDQUOT)"
    name = errno.errorcode.get(exc.errno or 0, "?")
    return f"{exc.strerror or exc} ({name})"
