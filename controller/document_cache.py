"""Parsed deployment documents by content digest, so a document is parsed once.

The operator API parses every document it accepts (that is the trust boundary) and puts the
typed result here; the desired-state push takes each document's extra files from here when it
builds manifests. Only a document this process has not seen (applied before a restart) is read
back from the store and parsed again. Bounded: the oldest entries go first.
"""

from __future__ import annotations

from collections import OrderedDict

from margo_stream.state.documents import Deployment

DEFAULT_ENTRIES = 4096


class DocumentCache:
    def __init__(self, max_entries: int = DEFAULT_ENTRIES) -> None:
        self._max = max_entries
        self._docs: OrderedDict[tuple[str, str], Deployment] = OrderedDict()

    def put(self, tenant: str, digest: str, document: Deployment) -> None:
        key = (tenant, digest)
        self._docs[key] = document
        self._docs.move_to_end(key)
        while len(self._docs) > self._max:
            self._docs.popitem(last=False)

    def get(self, tenant: str, digest: str) -> Deployment | None:
        return self._docs.get((tenant, digest))

    def __len__(self) -> int:
        return len(self._docs)
