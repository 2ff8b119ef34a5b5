"""Parsed deployment documents by content digest, with who signed them, so a document is
parsed once.

The operator API parses every document it accepts (that is the trust boundary) and puts the
typed result here, with the deploying operator's signature and certificate digest; the
desired-state push takes each document's extra files and authority from here when it builds
manifests. Only a document this process has not seen (applied before a restart) is read back
from the store and parsed again. Bounded: the oldest entries go first.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from margo_stream.state.documents import Deployment

DEFAULT_ENTRIES = 4096


@dataclass(frozen=True, slots=True)
class CachedDocument:
    document: Deployment
    signature: dict[str, Any] | None  # the operator's signature envelope
    certificate: str | None  # digest of the operator's certificate blob


class DocumentCache:
    def __init__(self, max_entries: int = DEFAULT_ENTRIES) -> None:
        self._max = max_entries
        self._docs: OrderedDict[tuple[str, str], CachedDocument] = OrderedDict()

    def put(self, tenant: str, digest: str, entry: CachedDocument) -> None:
        key = (tenant, digest)
        self._docs[key] = entry
        self._docs.move_to_end(key)
        while len(self._docs) > self._max:
            self._docs.popitem(last=False)

    def get(self, tenant: str, digest: str) -> CachedDocument | None:
        return self._docs.get((tenant, digest))

    def __len__(self) -> int:
        return len(self._docs)
