"""YAML for Margo documents: load to node trees, refuse hostile input, point errors at lines.

``load_yaml`` composes every document of the input to a node tree, so each later error can
name a line and column; ``check_nodes`` refuses duplicate mapping keys, recursive aliases and
documents that expand past ``MAX_NODES`` nodes (alias bombs) before anything is constructed
with the safe loader. ``NodeContext`` turns a path inside a document (``("spec", "files", 0)``)
into one ``DocumentError`` line: ``source:LINE:COLUMN: dotted.path: what is wrong``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

import yaml

from margo_stream.errors import DocumentError
from margo_stream.state.yaml_guard import (
    DEFAULT_LIMITS,
    MAX_DOCUMENT_BYTES,
    MAX_NODES,
    GuardedLoader,
    YamlLimitError,
    YamlLimits,
    yaml_error,
)

__all__ = [
    "MAX_DOCUMENT_BYTES",
    "MAX_NODES",
    "NodeContext",
    "NodePath",
    "check_nodes",
    "format_path",
    "load_yaml",
    "show",
    "yaml_type_name",
]

# A place inside a document: mapping keys and sequence indexes from the root.
NodePath = tuple[str | int, ...]


def show(value: object, limit: int = 60) -> str:
    """``repr(value)``, shortened so one message stays one readable line."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 5] + "...'"


def yaml_type_name(value: object) -> str:
    """The YAML name of a constructed value's type, for messages."""
    names = {
        str: "string",
        int: "integer",
        float: "number",
        bool: "boolean",
        list: "sequence",
        dict: "mapping",
        type(None): "null",
    }
    return names.get(type(value), type(value).__name__)


def format_path(path: Sequence[str | int]) -> str:
    """``("spec", "deploymentProfile", "components", 0, "name")`` -> dotted form."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        elif re.fullmatch(r"[A-Za-z_$][A-Za-z0-9_$-]*", part):
            out += f".{part}" if out else part
        else:
            out += f"[{json.dumps(part)}]"
    return out or "<document>"


class NodeContext:
    """One document being checked: its source name and node tree, to turn paths into marks."""

    def __init__(self, source: str, node: yaml.Node) -> None:
        self.source = source
        self.node = node

    def _mark(self, path: NodePath) -> yaml.Mark:
        node = self.node
        for part in path:
            child = None
            if isinstance(node, yaml.MappingNode):
                for key, value in node.value:
                    if isinstance(key, yaml.ScalarNode) and key.value == str(part):
                        child = value
                        break
            elif isinstance(node, yaml.SequenceNode) and isinstance(part, int):
                if 0 <= part < len(node.value):
                    child = node.value[part]
            if child is None:
                break
            node = child
        return node.start_mark

    def error(self, path: NodePath, message: str) -> DocumentError:
        """A ``DocumentError`` at the deepest node of ``path`` that exists in the document."""
        mark = self._mark(path)
        return DocumentError(
            f"{self.source}:{mark.line + 1}:{mark.column + 1}: {format_path(path)}: {message}"
        )


def check_nodes(root: yaml.Node, source: str, max_nodes: int = MAX_NODES) -> None:
    """Refuse duplicate mapping keys, recursive aliases and documents that expand past
    ``max_nodes`` nodes (alias bombs)."""
    sizes: dict[int, int] = {}
    active: set[int] = set()

    def size(node: yaml.Node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in active:
            m = node.start_mark
            raise DocumentError(f"{source}:{m.line + 1}:{m.column + 1}: recursive YAML alias")
        active.add(key)
        total = 1
        if isinstance(node, yaml.MappingNode):
            seen: dict[str, yaml.Mark] = {}
            for k, v in node.value:
                if isinstance(k, yaml.ScalarNode) and k.value != "<<":
                    if k.value in seen:
                        m, first = k.start_mark, seen[k.value]
                        raise DocumentError(
                            f"{source}:{m.line + 1}:{m.column + 1}: duplicate key {k.value!r} "
                            f"(first at line {first.line + 1})"
                        )
                    seen[k.value] = k.start_mark
                total += size(k) + size(v)
        elif isinstance(node, yaml.SequenceNode):
            total += sum(size(child) for child in node.value)
        active.discard(key)
        if total > max_nodes:
            m = node.start_mark
            raise YamlLimitError(
                f"{source}:{m.line + 1}:{m.column + 1}: document expands to more than "
                f"{max_nodes} YAML nodes (the limit; an alias bomb?)"
            )
        sizes[key] = total
        return total

    size(root)


def load_yaml(
    data: bytes,
    source: str,
    limits: YamlLimits = DEFAULT_LIMITS,
    *,
    events: Sequence[Any] | None = None,
) -> list[tuple[yaml.Node, Any]]:
    """Every document of ``data`` as (node tree, constructed value); empty documents skipped.

    The size is checked before parsing; depth, nodes and the deadline while the events are
    read (``yaml_guard``); alias expansion, duplicate keys and recursive aliases on the node
    tree (:func:`check_nodes`), before anything is constructed. ``events``: those of
    ``data``'s text, read and checked already (``yaml_split.split_with_events``)."""
    if len(data) > limits.max_document_bytes:
        raise YamlLimitError(
            f"{source}: document is {len(data)} bytes, more than "
            f"{limits.max_document_bytes} (the limit)"
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DocumentError(f"{source}: not UTF-8 (byte {exc.start}): {exc.reason}") from None
    docs: list[tuple[yaml.Node, Any]] = []
    loader = GuardedLoader(text, source, limits, events)
    try:
        while loader.check_node():
            node = loader.get_node()
            if node is None:  # check_node() said there is one
                break
            check_nodes(node, source, limits.max_nodes)
            value = loader.construct_document(node)
            if value is not None:
                docs.append((node, value))
    except yaml.YAMLError as exc:
        raise yaml_error(exc, source) from None
    finally:
        loader.dispose()
    return docs
