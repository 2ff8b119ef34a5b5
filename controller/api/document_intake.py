"""The deployment documents of an apply request: read in a worker thread, within limits.

YAML is the operator API's most expensive input, so no more than a small request's is parsed on
the event loop (which also carries every device session and ``/healthz``):
:func:`read_documents_off_loop` runs :func:`read_documents` in a worker thread beyond
:data:`INLINE_YAML_BYTES`, at most ``routes_common.WORKER_THREADS`` at a
time per API, so operators cannot occupy every thread of the pool. The thread is bounded too:

- the request's YAML is at most :data:`MAX_REQUEST_YAML_BYTES` (a 413 before any parsing);
- each document at most ``yaml_guard.MAX_DOCUMENT_BYTES``, nested at most ``MAX_DEPTH``,
  with at most ``MAX_NODES`` nodes, at most :data:`MAX_DOCUMENTS` documents per request;
- all of it within :data:`PARSE_TIME_LIMIT` seconds (a deadline checked on every event).

Every refusal is a ``DocumentError`` (``YamlLimitError`` for a limit) or a ``Problem`` that
the API answers with a 4xx problem; ``RecursionError`` and ``MemoryError`` from the parser,
which the limits are there to prevent, become a ``YamlLimitError`` too, logged in one line.
"""

from __future__ import annotations

import base64
import binascii
import logging
from collections.abc import Sequence
from typing import Any

import anyio
import anyio.to_thread

from controller.problems import Problem
from controller.store.base import Store
from margo_stream.errors import DocumentError
from margo_stream.state.digest import sha256_digest
from margo_stream.state.documents import Deployment, parse_deployment
from margo_stream.state.yaml_guard import YamlLimitError, YamlLimits
from margo_stream.state.yaml_split import split_with_events

log = logging.getLogger("margo.controller.api")

MAX_DOCUMENTS = 100  # per request
MAX_REQUEST_YAML_BYTES = 4 << 20  # all of a request's YAML texts together
PARSE_TIME_LIMIT = 2.0  # seconds for all of a request's documents
INLINE_YAML_BYTES = 8 << 10  # characters of YAML read on the loop (about 2 ms when legitimate)
INLINE_TIME_LIMIT = 0.1  # seconds: what a small request may hold the loop (aliases and all)


def read_documents(
    texts: Sequence[str], *, time_limit: float = PARSE_TIME_LIMIT
) -> list[tuple[bytes, Deployment]]:
    """Each document of ``texts`` as (exact bytes, validated deployment), in order.

    Blocking and CPU-bound: call it from a worker thread (:func:`read_documents_off_loop`)."""
    total = sum(len(text.encode("utf-8", "surrogatepass")) for text in texts)
    if total > MAX_REQUEST_YAML_BYTES:
        raise Problem(
            413,
            f"the request's documents are {total} bytes of YAML, more than "
            f"{MAX_REQUEST_YAML_BYTES} (the limit per request); apply them in several requests",
            kind="documents-too-large",
        )
    limits = YamlLimits(max_documents=MAX_DOCUMENTS).within(time_limit)
    docs: list[tuple[bytes, Deployment]] = []
    source = "documents"
    try:
        for i, text in enumerate(texts):
            source = f"documents[{i}]"
            chunks, events = split_with_events(text, source, limits)
            for data in chunks:  # a small single document is not parsed twice
                dep = parse_deployment(data, source=source, limits=limits, events=events)
                docs.append((data, dep))
                if len(docs) > MAX_DOCUMENTS:
                    raise Problem(
                        400, f"at most {MAX_DOCUMENTS} documents per request", kind="invalid-body"
                    )
    except (RecursionError, MemoryError) as exc:
        # the limits should make this unreachable; one line, never a traceback flood
        log.warning(
            "apply refused: %s: %s while parsing",
            source,
            type(exc).__name__,
            extra={"event": "document-parse-exhausted"},
        )
        raise YamlLimitError(
            f"{source}: the YAML is too deeply nested or too large to parse ({type(exc).__name__})"
        ) from None
    if not docs:
        raise DocumentError("no YAML document found in 'documents'")
    return docs


async def read_documents_off_loop(
    texts: Sequence[str], limiter: anyio.CapacityLimiter
) -> list[tuple[bytes, Deployment]]:
    """:func:`read_documents` in a worker thread, ``limiter`` bounding how many run at once;
    on the loop when the request's YAML is at most :data:`INLINE_YAML_BYTES`.

    A worker thread does not spare the loop the parse's CPU (the two share the interpreter's
    lock); it lets the loop run between the thread's 5 ms turns, which a long parse needs and a
    small one does not: a one-document apply parses in about 0.3 ms on the loop, while the hop
    to a thread and back costs up to a millisecond of the push's latency when the loop is busy
    with devices. A small text built to be slow (aliases) is refused after
    :data:`INLINE_TIME_LIMIT`, 50 times what a legitimate one takes."""
    if sum(len(t) for t in texts) <= INLINE_YAML_BYTES:
        return read_documents(texts, time_limit=INLINE_TIME_LIMIT)
    return await anyio.to_thread.run_sync(lambda: read_documents(texts), limiter=limiter)


__all__ = [
    "file_blobs",
    "MAX_DOCUMENTS",
    "MAX_REQUEST_YAML_BYTES",
    "PARSE_TIME_LIMIT",
    "read_documents",
    "read_documents_off_loop",
]


async def file_blobs(
    body: dict[str, Any], docs: Sequence[tuple[bytes, Deployment]], store: Store, tenant: str
) -> list[bytes]:
    """The request's ``blobs`` (base64), decoded; every file the documents name must be among
    them or already stored (``DocumentError`` naming the first missing one)."""
    blobs = body.get("blobs") or []
    if not isinstance(blobs, list):
        raise Problem(400, "'blobs' must be a list of base64 strings", kind="invalid-body")
    decoded: list[bytes] = []
    for i, blob in enumerate(blobs):
        try:
            decoded.append(base64.b64decode(blob, validate=True))
        except (binascii.Error, TypeError, ValueError):
            raise Problem(400, f"blobs[{i}] is not valid base64", kind="invalid-body") from None
    offered = {sha256_digest(b) for b in decoded}
    wanted = [dg for _, d in docs for dg in (f.digest for f in d.files) if dg not in offered]
    missing = await store.missing_blobs(tenant, wanted) if wanted else []
    if missing:
        raise DocumentError(f"file blob {missing[0]} is neither stored nor included in 'blobs'")
    return decoded
