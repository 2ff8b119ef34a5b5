"""YAML from strangers, within bounds: the one event stream every Margo document is read from.

PyYAML's pure Python parser is slow (a 1 MiB text is seconds of CPU) and its composer is
recursive (a document nested 50,000 deep ends in ``RecursionError`` after minutes). So every
document is read through :func:`guarded_events`:

- events come from libyaml's C parser (``yaml.CSafeLoader``) when PyYAML was built with it,
  else from the pure parser; both mark events with the same line, column and character index
  (the splitting of multi-document texts relies on the index);
- the stream is checked event by event, before anything is composed: nesting depth
  (:data:`MAX_DEPTH`), nodes per document before alias expansion (:data:`MAX_NODES`; after
  expansion ``yaml_nodes.check_nodes`` applies the same limit), the size of one document
  (:data:`MAX_DOCUMENT_BYTES`, counted in characters while scanning; the exact byte count is
  checked before a document is parsed), the number of documents and a deadline
  (``time.monotonic()``). The first limit passed stops the parse with a
  :class:`YamlLimitError` naming the place (``source:LINE:COLUMN``) and the limit.

:class:`GuardedLoader` composes node trees from that stream with PyYAML's own composer, safe
constructor and resolver, so the values are exactly those of ``yaml.SafeLoader``; with the
depth bounded, its recursion is too.
"""

from __future__ import annotations

import time
from collections.abc import Generator, Iterable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import yaml
from yaml.composer import Composer
from yaml.constructor import SafeConstructor
from yaml.resolver import Resolver

from margo_stream.errors import DocumentError

MAX_DEPTH = 64  # nested collections; a deployment document needs about ten
MAX_NODES = 100_000  # per document, counted on the event stream and again after aliases
MAX_DOCUMENT_BYTES = 1 << 20

# libyaml's parser when PyYAML has it; the pure parser marks events the same way
_PARSER: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

_COLLECTION_START = (yaml.SequenceStartEvent, yaml.MappingStartEvent)
_COLLECTION_END = (yaml.SequenceEndEvent, yaml.MappingEndEvent)
_NODE = (yaml.ScalarEvent, yaml.AliasEvent)


class YamlLimitError(DocumentError):
    """A YAML text passed one of the limits (depth, nodes, size, documents, time)."""


@dataclass(frozen=True, slots=True)
class YamlLimits:
    """What one parse may cost. ``deadline`` is a ``time.monotonic()`` value (None: no
    deadline); ``time_limit`` is the budget it was computed from, for the message."""

    max_depth: int = MAX_DEPTH
    max_nodes: int = MAX_NODES
    max_document_bytes: int = MAX_DOCUMENT_BYTES
    max_documents: int | None = None
    deadline: float | None = None
    time_limit: float | None = None

    def within(self, seconds: float) -> YamlLimits:
        """These limits with a deadline ``seconds`` from now."""
        return replace(self, deadline=time.monotonic() + seconds, time_limit=seconds)


DEFAULT_LIMITS = YamlLimits()


def uses_libyaml() -> bool:
    """True if events come from libyaml's C parser."""
    return _PARSER is not yaml.SafeLoader


def _at(source: str, mark: yaml.Mark | None) -> str:
    return f"{source}:{mark.line + 1}:{mark.column + 1}:" if mark is not None else f"{source}:"


def yaml_error(exc: yaml.YAMLError, source: str) -> DocumentError:
    """A parser or composer error as one located ``DocumentError`` line."""
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        what = exc.problem or "syntax error"
        if exc.context:
            cm = exc.context_mark
            started = (
                f" (started at {cm.line + 1}:{cm.column + 1})" if cm and cm is not mark else ""
            )
            what = f"{exc.context}{started}: {what}"
        where = f"{mark.line + 1}:{mark.column + 1}:" if mark else ""
        return DocumentError(f"{source}:{where} invalid YAML: {what}")
    return DocumentError(f"{source}: invalid YAML: {' '.join(str(exc).split())}")


def guarded_events(
    text: str, source: str, limits: YamlLimits = DEFAULT_LIMITS
) -> Generator[Any, None, None]:
    """The parse events of ``text``, stopped with :class:`YamlLimitError` at the first limit
    passed and with a located ``DocumentError`` at the first syntax error."""
    parser = _PARSER(text)
    depth = nodes = documents = 0
    doc_start = 0
    deadline = limits.deadline
    try:
        while True:
            try:
                event = parser.get_event()
            except yaml.YAMLError as exc:
                raise yaml_error(exc, source) from None
            if event is None:
                return
            mark = event.start_mark
            if deadline is not None and time.monotonic() > deadline:
                raise YamlLimitError(
                    f"{_at(source, mark)} parsing took longer than {limits.time_limit:g} s "
                    "(the limit); the input is too large or too complex"
                )
            if isinstance(event, _COLLECTION_START):
                depth += 1
                nodes += 1
                if depth > limits.max_depth:
                    raise YamlLimitError(
                        f"{_at(source, mark)} nested deeper than {limits.max_depth} levels "
                        "(the limit)"
                    )
            elif isinstance(event, _COLLECTION_END):
                depth -= 1
            elif isinstance(event, _NODE):
                nodes += 1
            elif isinstance(event, yaml.DocumentStartEvent):
                documents += 1
                nodes = 0
                doc_start = mark.index
                if limits.max_documents is not None and documents > limits.max_documents:
                    raise YamlLimitError(
                        f"{_at(source, mark)} more than {limits.max_documents} documents "
                        "(the limit)"
                    )
            if nodes > limits.max_nodes:
                raise YamlLimitError(
                    f"{_at(source, mark)} more than {limits.max_nodes} YAML nodes in one "
                    "document (the limit)"
                )
            if event.end_mark.index - doc_start > limits.max_document_bytes:
                raise YamlLimitError(
                    f"{_at(source, mark)} the document is larger than "
                    f"{limits.max_document_bytes} bytes (the limit)"
                )
            yield event
    finally:
        parser.dispose()


class GuardedLoader(Composer, SafeConstructor, Resolver):
    """PyYAML's composer, safe constructor and resolver over :func:`guarded_events`."""

    def __init__(
        self,
        text: str,
        source: str,
        limits: YamlLimits = DEFAULT_LIMITS,
        events: Iterable[Any] | None = None,
    ) -> None:
        """``events``: the text's events, read through :func:`guarded_events` already."""
        self._events: Iterator[Any] = (
            guarded_events(text, source, limits) if events is None else iter(events)
        )
        self._current: Any = None
        Composer.__init__(self)
        SafeConstructor.__init__(self)
        Resolver.__init__(self)

    def peek_event(self) -> Any:
        if self._current is None:
            self._current = next(self._events, None)
        return self._current

    def check_event(self, *choices: Any) -> bool:
        event = self.peek_event()
        if event is None:
            return False
        return not choices or isinstance(event, choices)

    def get_event(self) -> Any:
        event = self.peek_event()
        self._current = None
        return event

    def dispose(self) -> None:
        close = getattr(self._events, "close", None)
        if close is not None:
            close()


__all__ = [
    "DEFAULT_LIMITS",
    "MAX_DEPTH",
    "MAX_DOCUMENT_BYTES",
    "MAX_NODES",
    "GuardedLoader",
    "YamlLimitError",
    "YamlLimits",
    "guarded_events",
    "uses_libyaml",
    "yaml_error",
]
