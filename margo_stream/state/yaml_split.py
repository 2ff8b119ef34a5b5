"""A YAML text as the exact bytes of each document in it.

Digests are over exact bytes, so the operator's ``margoctl`` (which signs each document) and
the controller (which stores each as a blob) must cut a multi-document text the same way: this
one function does it for both. The text is read through ``yaml_guard.guarded_events``, so a
hostile text stops at the first limit it passes (depth, nodes, size of one document, number
of documents, deadline) without being composed.
"""

from __future__ import annotations

from typing import Any

import yaml

from margo_stream.state.yaml_guard import DEFAULT_LIMITS, YamlLimits, guarded_events

REPLAY_CHARS = 64 * 1024  # a single document this small keeps its events for its loader


def split_documents(text: str, source: str, limits: YamlLimits = DEFAULT_LIMITS) -> list[bytes]:
    """The exact bytes of each YAML document in ``text`` (digests are over exact bytes, so a
    multi-document file becomes one blob per document; a single document is kept whole,
    comments included). Raises ``DocumentError`` (``YamlLimitError`` for a limit)."""
    return split_with_events(text, source, limits)[0]


def split_with_events(
    text: str, source: str, limits: YamlLimits = DEFAULT_LIMITS
) -> tuple[list[bytes], list[Any] | None]:
    """:func:`split_documents`, and when ``text`` is one document of at most
    :data:`REPLAY_CHARS` characters, its parse events (already checked against ``limits``):
    ``yaml_nodes.load_yaml(..., events=)`` composes them instead of parsing the text again."""
    out: list[bytes] = []
    start: int | None = None
    # marks count characters after a byte order mark (libyaml never counts it): cut without it
    body = text[1:] if text.startswith("\ufeff") else text
    kept: list[Any] | None = [] if len(body) <= REPLAY_CHARS else None
    for event in guarded_events(body, source, limits):  # the parser marks every event
        if kept is not None:
            kept.append(event)
        if isinstance(event, yaml.DocumentStartEvent) and event.start_mark is not None:
            start = event.start_mark.index
        elif (
            isinstance(event, yaml.DocumentEndEvent)
            and start is not None
            and event.end_mark is not None
        ):
            chunk = body[start : event.end_mark.index]
            if chunk.strip() and chunk.strip() != "---":
                out.append(chunk.encode("utf-8"))
            start = None
    if len(out) == 1:
        return [text.encode("utf-8")], kept  # a single document: exactly the bytes given
    return out, None
