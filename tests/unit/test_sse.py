"""SSE decoder and encoders: framing under every split, spec line-end rules, field parsing, trailing partials."""

from __future__ import annotations

import json
import re

import pytest

from router_app.sse import (
    DONE_EVENT,
    KEEPALIVE_EVENT,
    SSEDecoder,
    SSEEvent,
    encode_comment,
    encode_json_event,
)


def decode_all(chunks: list[bytes]) -> tuple[list[SSEEvent], SSEEvent | None]:
    decoder = SSEDecoder()
    events: list[SSEEvent] = []
    for chunk in chunks:
        events.extend(decoder.feed(chunk))
    return events, decoder.flush()


def reference_raws(stream: bytes) -> tuple[list[bytes], bytes]:
    """An independent, obviously-correct framing: walk whole lines of the complete input."""
    raws: list[bytes] = []
    start = 0
    has_line = False
    pos = 0
    for match in re.finditer(rb"\r\n|\r|\n", stream):
        if match.start() == pos:
            if has_line:
                raws.append(stream[start : match.end()])
                start = match.end()
                has_line = False
        else:
            has_line = True
        pos = match.end()
    return raws, stream[start:]


ENGINE_STREAM = (
    b'data: {"id":"c1","choices":[{"index":0,"delta":{"role":"assistant","content":null}}]}\n\n'
    b": ping\n\n"
    b'data: {"id":"c1","choices":[{"index":0,"delta":{"content":"h\xc3\xa9llo \xe2\x9a\xa1"}}]}\n\n'
    b'error: {"code":500,"message":"boom","type":"server_error"}\n\n'
    b"data: [DONE]\n\n"
)

MIXED_LINE_ENDS = (
    b"data: a\r\n\r\n"
    b"data: b\r\rdata: c\n\n"
    b": note\r\ndata: d\r\ndata: e\r\n\r\n"
    b"\n\nevent: x\ndata: f\n\n"
    b"data: \xf0\x9f\x94\x80 g\r\n\n"
)


@pytest.mark.parametrize("stream", [ENGINE_STREAM, MIXED_LINE_ENDS], ids=["engine", "mixed"])
def test_every_single_split_point_gives_the_same_events(stream: bytes) -> None:
    whole, whole_rest = decode_all([stream])
    assert [e.raw for e in whole] == reference_raws(stream)[0]
    for cut in range(len(stream) + 1):
        events, rest = decode_all([stream[:cut], stream[cut:]])
        assert events == whole, cut
        assert rest == whole_rest, cut


@pytest.mark.parametrize("stream", [ENGINE_STREAM, MIXED_LINE_ENDS], ids=["engine", "mixed"])
def test_byte_by_byte_gives_the_same_events_and_no_byte_is_lost(stream: bytes) -> None:
    events, rest = decode_all([stream[i : i + 1] for i in range(len(stream))])
    whole, _ = decode_all([stream])
    assert events == whole
    assert b"".join(e.raw for e in events) == stream
    assert rest is None


def test_every_pair_of_split_points_on_crlf_stream() -> None:
    stream = b"data: 1\r\n\r\ndata: 2\r\rdata: 3\n\r\n"
    whole, whole_rest = decode_all([stream])
    for i in range(len(stream) + 1):
        for j in range(i, len(stream) + 1):
            events, rest = decode_all([stream[:i], stream[i:j], stream[j:]])
            assert events == whole, (i, j)
            assert rest == whole_rest


def test_lf_fast_path_then_cr_arrives_mid_event() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a\n") == []
    assert decoder.feed(b"data: b") == []
    assert [e.raw for e in decoder.feed(b"\r\n\r\n")] == [b"data: a\ndata: b\r\n\r\n"]
    assert [e.raw for e in decoder.feed(b"data: c\n")] == []
    assert [e.raw for e in decoder.feed(b"\n")] == [b"data: c\n\n"]


def test_cr_path_then_lf_only_bytes_arrive() -> None:
    decoder = SSEDecoder()
    assert [e.raw for e in decoder.feed(b"data: a\r\n\r\ndata: b\r\n")] == [b"data: a\r\n\r\n"]
    # The pending event ends in CRLF; the next feed has no CR at all but still completes it.
    assert [e.raw for e in decoder.feed(b"\n")] == [b"data: b\r\n\n"]


def test_cr_event_then_lf_only_remainder_completed_by_a_lone_lf() -> None:
    decoder = SSEDecoder()
    # The CR path dispatches the first event and leaves "data: b\n" (no CR left) at a line start.
    assert [e.raw for e in decoder.feed(b"data: a\r\n\r\ndata: b\n")] == [b"data: a\r\n\r\n"]
    assert [e.raw for e in decoder.feed(b"\n")] == [b"data: b\n\n"]


def test_lone_cr_at_end_is_held_until_the_next_byte() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a\r\r") == []
    # An LF after the CR belongs to the same (CRLF) line end and so to the same event.
    assert [e.raw for e in decoder.feed(b"\ndata: b\n\n")] == [b"data: a\r\r\n", b"data: b\n\n"]
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a\r\r") == []
    assert [e.raw for e in decoder.feed(b"d")] == [b"data: a\r\r"]


def test_cr_cr_is_two_line_ends_and_crlf_is_one() -> None:
    events, rest = decode_all([b"data: x\r\n"])
    assert events == [] and rest is not None and not rest.complete
    events, rest = decode_all([b"data: x\r\rdata: y\n\n"])
    assert [e.data for e in events] == ["x", "y"]


def test_flush_reports_complete_when_only_a_final_lone_cr_was_held() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: x\r\r") == []
    rest = decoder.flush()
    assert rest is not None and rest.complete and rest.data == "x" and rest.raw == b"data: x\r\r"
    decoder = SSEDecoder()
    decoder.feed(b"data: x\n\r")
    rest = decoder.flush()
    assert rest is not None and rest.complete


def test_flush_returns_trailing_partial_event() -> None:
    decoder = SSEDecoder()
    assert [e.data for e in decoder.feed(b'data: {"a":1}\n\ndata: {"b"')] == ['{"a":1}']
    rest = decoder.flush()
    assert rest is not None
    assert rest.raw == b'data: {"b"'
    assert rest.complete is False
    assert rest.data == '{"b"'
    assert decoder.flush() is None  # reset


@pytest.mark.parametrize("tail", [b"data: x", b"data: x\n", b"data: x\r", b"data: x\r\n", b": c\n"])
def test_flush_partial_variants(tail: bytes) -> None:
    decoder = SSEDecoder()
    assert decoder.feed(tail) == []
    rest = decoder.flush()
    assert rest is not None and rest.raw == tail and not rest.complete


@pytest.mark.parametrize("tail", [b"", b"\n", b"\r\n\r\n", b"\n\n\n"])
def test_flush_with_only_empty_lines_is_none(tail: bytes) -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a\n\n" + tail) != []
    assert decoder.flush() is None


def test_pending_shows_unreturned_bytes() -> None:
    decoder = SSEDecoder()
    decoder.feed(b"data: a\n\ndata: b")
    assert decoder.pending == b"data: b"


def test_leading_empty_lines_are_kept_in_the_next_events_raw() -> None:
    events, rest = decode_all([b"\n\n\r\ndata: a\n\n"])
    assert [e.raw for e in events] == [b"\n\n\r\ndata: a\n\n"]
    assert events[0].data == "a"
    assert rest is None


def test_empty_feed_returns_nothing() -> None:
    assert SSEDecoder().feed(b"") == []


def test_utf8_character_split_across_feeds() -> None:
    payload = "data: ⚡ 🔀 é\n\n".encode()
    for cut in range(len(payload)):
        events, _ = decode_all([payload[:cut], payload[cut:]])
        assert [e.data for e in events] == ["⚡ 🔀 é"]


def test_multiple_events_in_one_feed() -> None:
    events, _ = decode_all([b"data: 1\n\ndata: 2\n\ndata: 3\n\n"])
    assert [e.data for e in events] == ["1", "2", "3"]


# Field parsing


def parse(raw: bytes) -> SSEEvent:
    (event,) = decode_all([raw])[0]
    return event


def test_multi_line_data_joined_with_newline() -> None:
    event = parse(b"data: first\ndata:second\ndata:  third\n\n")
    assert event.data == "first\nsecond\n third"


def test_data_without_value_and_empty_data() -> None:
    assert parse(b"data\n\n").data == ""
    assert parse(b"data:\n\n").data == ""
    assert parse(b"data:\ndata:\n\n").data == "\n"
    assert parse(b"event: x\n\n").data is None


def test_only_one_leading_space_is_removed() -> None:
    assert parse(b"data:   x \n\n").data == "  x "


def test_event_name_id_and_unknown_fields() -> None:
    event = parse(b"event: status\nid: 7\nretry: 100\nfoo\ndata: x\n\n")
    assert event.event == "status"
    assert event.id == "7"
    assert event.fields == (("event", "status"), ("id", "7"), ("retry", "100"), ("foo", ""), ("data", "x"))


def test_id_with_nul_is_ignored() -> None:
    assert parse(b"id: a\x00b\ndata: x\n\n").id is None


def test_comments() -> None:
    event = parse(b": keep-alive\n:no-space\n\n")
    assert event.comments == ("keep-alive", "no-space")
    assert event.is_comment_only
    assert event.data is None
    mixed = parse(b": hi\ndata: x\n\n")
    assert mixed.comments == ("hi",)
    assert not mixed.is_comment_only


def test_is_done() -> None:
    assert parse(b"data: [DONE]\n\n").is_done
    assert parse(b"data:[DONE]\r\n\r\n").is_done
    assert not parse(b'data: {"x":"[DONE]"}\n\n').is_done
    assert not parse(b": [DONE]\n\n").is_done


def test_bare_error_line_is_exposed() -> None:
    event = parse(b'error: {"code":500,"message":"boom"}\n\n')
    assert event.error == '{"code":500,"message":"boom"}'
    assert event.data is None
    assert not event.is_comment_only
    assert ("error", '{"code":500,"message":"boom"}') in event.fields
    assert parse(b"data: x\n\n").error is None


def test_crlf_lines_parse_like_lf_lines() -> None:
    assert parse(b"data: a\r\ndata: b\r\n\r\n").data == "a\nb"
    events, _ = decode_all([b"data: a\rdata: b\r\rx"])
    assert events[0].data == "a\nb"


def test_bom_is_ignored() -> None:
    assert parse(b"\xef\xbb\xbfdata: x\n\n").data == "x"


def test_invalid_utf8_does_not_raise() -> None:
    assert parse(b"data: \xff\n\n").data == "\ufffd"


def test_event_equality_and_repr() -> None:
    assert SSEEvent(b"data: x\n\n") == SSEEvent(b"data: x\n\n")
    assert SSEEvent(b"x", complete=False) != SSEEvent(b"x")
    assert SSEEvent(b"x") != "x"
    assert len({SSEEvent(b"a"), SSEEvent(b"a")}) == 1
    assert "complete=False" in repr(SSEEvent(b"x", complete=False))


# Encoders


def test_encode_json_event_is_one_compact_line_and_keeps_unicode() -> None:
    raw = encode_json_event({"a": "⚡ line1\nline2\r", "b": [1, 2]})
    assert raw == 'data: {"a":"⚡ line1\\nline2\\r","b":[1,2]}\n\n'.encode()
    assert raw.count(b"\n") == 2 and b"\r" not in raw
    event = parse(raw)
    assert json.loads(event.data or "") == {"a": "⚡ line1\nline2\r", "b": [1, 2]}


def test_encode_json_event_escapes_unicode_line_separators_harmlessly() -> None:
    raw = encode_json_event({"a": "x\u2028y"})
    event = parse(raw)
    assert json.loads(event.data or "") == {"a": "x\u2028y"}


def test_comment_and_done_encoders() -> None:
    assert encode_comment() == b": keep-alive\n\n" == KEEPALIVE_EVENT
    assert encode_comment("a\nb") == b": a\n: b\n\n"
    assert parse(encode_comment("a\r\nb")).comments == ("a", "b")
    assert DONE_EVENT == b"data: [DONE]\n\n"
    assert parse(DONE_EVENT).is_done
