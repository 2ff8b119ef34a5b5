"""YAML from operators and controllers within bounds: depth, nodes, size, documents and time
checked on the event stream (``yaml_guard``), and the request reader the API runs in a thread
(``controller.api.document_intake``)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from controller.api.document_intake import MAX_REQUEST_YAML_BYTES, read_documents
from controller.problems import Problem
from margo_stream.errors import DocumentError
from margo_stream.state.documents import parse_deployment
from margo_stream.state.yaml_guard import (
    MAX_DEPTH,
    MAX_NODES,
    YamlLimitError,
    YamlLimits,
    guarded_events,
    uses_libyaml,
)
from margo_stream.state.yaml_nodes import load_yaml
from margo_stream.state.yaml_split import REPLAY_CHARS, split_documents, split_with_events

DATA = Path(__file__).resolve().parents[1] / "data" / "documents"

# the inputs that froze the controller (issue 14), and their relatives
NESTED_BLOCK = "- " * 50_000 + "x\n"  # 97 KiB, 50,000 sequences deep
NESTED_FLOW = "[" * 50_000
NESTED_MAP = "".join("  " * i + "a:\n" for i in range(200))
FLAT = "".join(f"key{i}: value {i}\n" for i in range(180_000))  # ~3.8 MiB, one document
BOMB = (
    "a: &a [x, x, x, x, x, x, x, x, x, x]\n"
    + "".join(
        f"{k}: &{k} [{', '.join(['*' + p] * 10)}]\n" for p, k in zip("abcd", "bcde", strict=True)
    )
    + "f: [*e, *e, *e, *e, *e, *e, *e, *e, *e, *e]\n"
)


def nested(depth: int) -> str:
    """A mapping ``depth`` collections deep."""
    return "".join("  " * i + "a:\n" for i in range(depth - 1)) + "  " * (depth - 1) + "a: 1\n"


def fast(fn, *args, **kw):  # type: ignore[no-untyped-def]
    """``fn(*args)``'s exception, asserting it came quickly (the bug took 107 s)."""
    start = time.perf_counter()
    with pytest.raises(DocumentError) as info:
        fn(*args, **kw)
    assert time.perf_counter() - start < 1.0
    message = str(info.value)
    assert "\n" not in message and len(message) < 300
    return info.value


def test_libyaml_parses_here() -> None:
    assert uses_libyaml()  # PyYAML here has libyaml; the guard reads events from it


@pytest.mark.parametrize("text", [NESTED_BLOCK, NESTED_MAP], ids=["block-seq", "block-map"])
def test_depth_is_refused_at_the_limit_naming_the_place(text: str) -> None:
    for fn in (split_documents, load_yaml):
        arg = text if fn is split_documents else text.encode()
        exc = fast(fn, arg, "doc.yaml")
        assert isinstance(exc, YamlLimitError)
        assert f"nested deeper than {MAX_DEPTH} levels (the limit)" in str(exc)
        assert str(exc).startswith("doc.yaml:")  # doc.yaml:LINE:COLUMN
        line, column = str(exc).split(":")[1:3]
        assert int(line) >= 1 and int(column) >= 1


def test_flow_nesting_is_refused_too() -> None:
    exc = fast(split_documents, NESTED_FLOW, "doc.yaml")
    assert "nest" in str(exc) and str(exc).startswith("doc.yaml:1:")


def test_the_depth_limit_itself_is_allowed() -> None:
    [(node, value)] = load_yaml(nested(MAX_DEPTH).encode(), "ok")
    assert isinstance(value, dict)
    with pytest.raises(YamlLimitError, match=f"{MAX_DEPTH + 1}:"):
        load_yaml(nested(MAX_DEPTH + 1).encode(), "deep")


def test_nodes_are_counted_on_the_event_stream() -> None:
    text = "[" + "1," * MAX_NODES + "1]"
    exc = fast(split_documents, text, "wide")
    assert f"more than {MAX_NODES} YAML nodes in one document (the limit)" in str(exc)
    small = YamlLimits(max_nodes=10)
    with pytest.raises(YamlLimitError, match="more than 10 YAML nodes"):
        list(guarded_events("[" + "1," * 10 + "1]", "w", small))


def test_an_alias_bomb_is_refused_after_expansion() -> None:
    assert split_documents(BOMB, "bomb") == [BOMB.encode()]  # few events: the cut is fine
    exc = fast(load_yaml, BOMB.encode(), "bomb")
    assert f"expands to more than {MAX_NODES} YAML nodes" in str(exc)


def test_a_large_document_stops_the_scan_at_the_size_limit() -> None:
    exc = fast(split_documents, FLAT, "flat")
    assert "the document is larger than 1048576 bytes (the limit)" in str(exc)
    exc = fast(load_yaml, FLAT.encode(), "flat")  # checked before parsing
    assert f"document is {len(FLAT)} bytes, more than 1048576" in str(exc)


def test_documents_and_time_are_bounded() -> None:
    text = "---\na: 1\n" * 20
    with pytest.raises(YamlLimitError, match=r"^t:13:1: more than 6 documents \(the limit\)"):
        split_documents(text, "t", YamlLimits(max_documents=6))
    expired = YamlLimits(deadline=time.monotonic() - 1, time_limit=2.0)
    with pytest.raises(YamlLimitError, match=r"parsing took longer than 2 s \(the limit\)"):
        split_documents(text, "t", expired)


def test_the_cut_is_byte_for_byte_what_it_was() -> None:
    """Digests are over exact bytes; margoctl signs what the controller stores."""
    single = "# comment\na: é\n"
    assert split_documents(single, "s") == [single.encode()]
    text = "a: 1 # one\n---\n# two\nb: ü€\n...\n---\n---\nc: [1,\n  2]\n"
    expected = [b"a: 1 # one\n", "---\n# two\nb: ü€\n...".encode(), b"---\nc: [1,\n  2]\n"]
    assert split_documents(text, "m") == expected
    bom = "\ufeffa: 1\n---\nb: 2\n"
    assert split_documents(bom, "b") == [b"a: 1\n", b"---\nb: 2\n"]


def pure_cut(text: str) -> list[bytes]:
    """The cut as it was made with PyYAML's pure parser (the reference)."""
    out, start = [], None
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, yaml.DocumentStartEvent):
            start = event.start_mark.index
        elif isinstance(event, yaml.DocumentEndEvent) and start is not None:
            chunk = text[start : event.end_mark.index]
            if chunk.strip() and chunk.strip() != "---":
                out.append(chunk.encode())
            start = None
    return [text.encode()] if len(out) == 1 else out


PIECES = ["---\n", "...\n", "# note\n", "a: 1\n", "b: [x, 'ü']\n", "c: |\n  text\n", "\n",
          "- é\n", "d: {k: v}  # €\n", "--- # after\n", "e: >\n  folded\n\n"]  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(PIECES), max_size=12), st.booleans())
def test_the_cut_equals_the_pure_parsers(pieces: list[str], bom: bool) -> None:
    text = ("\ufeff" if bom else "") + "".join(pieces)
    try:
        reference = pure_cut(text)
    except yaml.YAMLError:
        with pytest.raises(DocumentError):
            split_documents(text, "p")
        return
    assert split_documents(text, "p") == reference


@pytest.mark.parametrize("path", sorted((DATA / "valid").glob("*.yaml")), ids=lambda p: p.name)
def test_values_are_those_of_the_safe_loader(path: Path) -> None:
    data = path.read_bytes()
    loaded = [value for _, value in load_yaml(data, path.name)]
    assert loaded == [d for d in yaml.safe_load_all(data) if d is not None]


def test_syntax_errors_are_one_located_line() -> None:
    exc = fast(split_documents, "a: [1\nb: 2\n", "bad")
    assert str(exc).startswith("bad:") and "invalid YAML" in str(exc)


def test_the_request_reader_refuses_every_hostile_input_quickly() -> None:
    for text in (NESTED_BLOCK, NESTED_FLOW, FLAT, BOMB, "---\na: 1\n" * 500):
        fast(read_documents, [text])
    with pytest.raises(Problem) as info:
        read_documents(["a: 1\n" * (MAX_REQUEST_YAML_BYTES // 5 + 1)])
    assert info.value.status == 413 and info.value.kind == "documents-too-large"


def test_the_request_reader_runs_out_of_time_with_a_clear_error() -> None:
    many = "".join(f"---\nk{j}:\n" + "  k: v\n" * 2000 for j in range(50))
    with pytest.raises(YamlLimitError, match=r"took longer than 0\.001 s"):
        read_documents([many], time_limit=0.001)


def test_parse_deployment_keeps_the_limits() -> None:
    with pytest.raises(YamlLimitError):
        parse_deployment(NESTED_BLOCK.encode())


def test_a_small_single_document_is_composed_from_the_events_of_its_cut() -> None:
    """The API parses a one-document apply once: the events read to cut the text are
    composed again by the loader; what comes out, and every error, is what a parse of the
    bytes gives."""
    text = (Path(__file__).resolve().parents[2] / "examples" / "process-heartbeat.yaml").read_text()
    chunks, events = split_with_events(text, "doc")
    assert chunks == [text.encode()] and events is not None
    assert parse_deployment(chunks[0], events=events) == parse_deployment(chunks[0])
    assert read_documents([text]) == [(chunks[0], parse_deployment(chunks[0]))]
    for bad in ("a: 1\na: 2\n", BOMB.replace("&e", "&e2") + "f: [*e, *e]\n", "kind: [1, 2]\n"):
        _, events = split_with_events(bad, "bad")
        with pytest.raises(DocumentError) as replayed:
            parse_deployment(bad.encode(), source="bad", events=events)
        with pytest.raises(DocumentError) as parsed:
            parse_deployment(bad.encode(), source="bad")
        assert str(replayed.value) == str(parsed.value) and type(replayed.value) is type(
            parsed.value
        )
    # several documents, or one past the size kept, are parsed from their bytes
    assert split_with_events("a: 1\n---\nb: 2\n", "m")[1] is None
    assert split_with_events("a: " + "x" * (REPLAY_CHARS + 1) + "\n", "l")[1] is None
