"""A YAML text as the exact bytes of each document in it.

Digests are over exact bytes, so the operator's ``margoctl`` (which signs each document) and
the controller (which stores each as a blob) must cut a multi-document text the same way: this
one function does it for both.
"""

from __future__ import annotations

import yaml

from margo_stream.errors import DocumentError


def split_documents(text: str, source: str) -> list[bytes]:
    """The exact bytes of each YAML document in ``text`` (digests are over exact bytes, so a
    multi-document file becomes one blob per document; a single document is kept whole,
    comments included)."""
    try:
        events = list(yaml.parse(text, Loader=yaml.SafeLoader))
    except yaml.YAMLError as exc:
        raise DocumentError(f"{source}: invalid YAML: {exc}") from None
    out: list[bytes] = []
    start: int | None = None
    for event in events:  # the parser marks every event; the stubs allow None
        if isinstance(event, yaml.DocumentStartEvent) and event.start_mark is not None:
            start = event.start_mark.index
        elif (
            isinstance(event, yaml.DocumentEndEvent)
            and start is not None
            and event.end_mark is not None
        ):
            chunk = text[start : event.end_mark.index]
            if chunk.strip() and chunk.strip() != "---":
                out.append(chunk.encode("utf-8"))
            start = None
    if len(out) == 1:
        return [text.encode("utf-8")]  # a single document: exactly the bytes given
    return out
