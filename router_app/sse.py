"""Server-sent events: an incremental decoder that keeps each event's raw bytes, and encoders for what we inject.

Sans-IO: fed bytes, returns events. The proxy forwards `SSEEvent.raw` untouched (byte-for-byte) and only looks at
the parsed fields when a cheap byte test says it must: parsing is lazy and happens on first access of a field.

Framing follows the WHATWG SSE spec: a line ends at CRLF, LF or CR; an event ends at an empty line. Field parsing
too (`name: value`, one optional space after the colon, `:` starts a comment, a line without a colon is a field
with an empty value), with two deliberate differences, both harmless for OpenAI streams:
- unknown field names are kept (`SSEEvent.fields`): llama-server can send a bare `error: {...}` line mid-stream,
  which the proxy must turn into a `data: {"error": ...}` event rather than drop (`SSEEvent.error`);
- a UTF-8 byte order mark is ignored at the start of any event, not only the first.
Empty lines that come before an event's first line belong to that event's raw bytes, so no byte is ever lost and
no event is ever empty.
"""

from __future__ import annotations

import json
import re
from typing import Any

DONE_EVENT = b"data: [DONE]\n\n"
"""The OpenAI end-of-stream marker, as an encoded event."""

KEEPALIVE_EVENT = b": keep-alive\n\n"
"""A comment event: ignored by every client, keeps proxies and the client's read timeout from firing."""

_LINE_END = re.compile(rb"\r\n|\r|\n")
_TEXT_LINE_END = re.compile(r"\r\n|\r|\n")
_BOM = "\ufeff"


class SSEEvent:
    """One complete (or, from `SSEDecoder.flush`, trailing partial) event.

    `raw` holds the exact bytes received, terminating empty line included. Every other attribute is parsed from
    `raw` on first access and then cached.
    """

    __slots__ = ("_comments", "_data", "_error", "_event", "_fields", "_id", "complete", "raw")

    def __init__(self, raw: bytes, complete: bool = True) -> None:
        self.raw = raw
        self.complete = complete
        """False only for the leftover returned by `SSEDecoder.flush`: the stream ended inside this event."""
        self._fields: tuple[tuple[str, str], ...] | None = None

    def __repr__(self) -> str:
        state = "" if self.complete else ", complete=False"
        return f"SSEEvent({self.raw!r}{state})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SSEEvent):
            return NotImplemented
        return self.raw == other.raw and self.complete == other.complete

    def __hash__(self) -> int:
        return hash((self.raw, self.complete))

    @property
    def fields(self) -> tuple[tuple[str, str], ...]:
        """Every `name: value` field line in order, unknown names included (comments excluded)."""
        if self._fields is None:
            self._parse()
        assert self._fields is not None
        return self._fields

    @property
    def data(self) -> str | None:
        """The `data` lines joined with "\\n"; None when the event has no data line at all."""
        if self._fields is None:
            self._parse()
        return self._data

    @property
    def event(self) -> str | None:
        """The `event` field (the event type), None when absent."""
        if self._fields is None:
            self._parse()
        return self._event

    @property
    def id(self) -> str | None:
        """The `id` field, None when absent."""
        if self._fields is None:
            self._parse()
        return self._id

    @property
    def comments(self) -> tuple[str, ...]:
        """Comment lines without their leading ':' and the one space after it."""
        if self._fields is None:
            self._parse()
        return self._comments

    @property
    def error(self) -> str | None:
        """Value of a non-standard `error` field (llama-server's bare `error: {...}` line), lines joined with "\\n"."""
        if self._fields is None:
            self._parse()
        return self._error

    @property
    def is_done(self) -> bool:
        """True for the OpenAI terminator `data: [DONE]`."""
        return self.data == "[DONE]"

    @property
    def is_comment_only(self) -> bool:
        """True when the event holds comments and no field at all (keep-alive pings)."""
        return not self.fields and bool(self.comments)

    def _parse(self) -> None:
        text = self.raw.decode("utf-8", errors="replace")
        if text.startswith(_BOM):
            text = text[1:]
        # Engines end lines with LF only: a plain split is much cheaper than the regex and gives the same lines.
        lines = _TEXT_LINE_END.split(text) if "\r" in text else text.split("\n")
        fields: list[tuple[str, str]] = []
        comments: list[str] = []
        data: list[str] = []
        errors: list[str] = []
        event: str | None = None
        last_id: str | None = None
        for line in lines:
            if not line:
                continue
            name, colon, value = line.partition(":")
            if value.startswith(" "):
                value = value[1:]
            if not name and colon:
                comments.append(value)
                continue
            fields.append((name, value))
            if name == "data":
                data.append(value)
            elif name == "event":
                event = value
            elif name == "id" and "\0" not in value:
                last_id = value
            elif name == "error":
                errors.append(value)
        self._fields = tuple(fields)
        self._comments = tuple(comments)
        self._data = "\n".join(data) if data else None
        self._error = "\n".join(errors) if errors else None
        self._event = event
        self._id = last_id


class SSEDecoder:
    """Splits a byte stream into events; feed it chunks split anywhere (inside a UTF-8 character, between CR and LF).

    Usage::

        decoder = SSEDecoder()
        async for chunk in upstream:
            for event in decoder.feed(chunk):
                forward(event.raw)
        leftover = decoder.flush()   # not None: the upstream ended inside an event

    An event whose final empty line is a lone CR at the very end of the input so far is held back until the next
    byte shows whether an LF follows (CRLF is one line end, CR CR is two). LF-terminated streams, which is what
    every engine sends, are never delayed.
    """

    __slots__ = ("_buf", "_has_line", "_scan")

    def __init__(self) -> None:
        # Bytes, not a bytearray: the pending tail is short, and slicing bytes yields the events' raw bytes directly.
        self._buf = b""
        # Where to resume scanning: always a line start, or (LF-only fast path) at most one byte before the end.
        self._scan = 0
        # Whether the pending event has a non-empty line yet (empty lines before it are only a prefix).
        self._has_line = False

    @property
    def pending(self) -> bytes:
        """Bytes received but not yet part of a returned event."""
        return self._buf

    def feed(self, data: bytes) -> list[SSEEvent]:
        """Add bytes; return the events they complete, in order (often none, often one)."""
        if not data:
            return []
        if (
            not self._buf
            and data.endswith(b"\n\n")
            and data[0] != 0x0A
            and data.find(b"\n\n") == len(data) - 2
            and b"\r" not in data
        ):
            # The common case, one whole LF-terminated event per read: no buffering, no loop.
            return [SSEEvent(data)]
        buf = self._buf + data if self._buf else data
        if b"\r" in buf:
            return self._split_any_line_end(buf)
        return self._split_lf_only(buf)

    def flush(self) -> SSEEvent | None:
        """End of input: return what is left as an event, or None when nothing but empty lines remains.

        The result has `complete=False` unless the leftover is a whole event whose final empty line was a lone CR
        (held back by `feed` to see if an LF followed). Per the SSE spec a client discards an incomplete event; the
        proxy uses it to tell that the upstream stopped mid-event. The decoder is reset afterwards.
        """
        buf = self._buf
        self._buf = b""
        self._scan = 0
        self._has_line = False
        if not buf.strip(b"\r\n"):
            return None
        # Everything complete was returned by feed, except an event held back by its final lone CR: at end of
        # input that CR is a line end, and it makes an empty line when the byte before it ended a line too.
        complete = buf.endswith(b"\r") and buf[-2:-1] in (b"\r", b"\n")
        return SSEEvent(buf, complete=complete)

    def _split_lf_only(self, buf: bytes) -> list[SSEEvent]:
        events: list[SSEEvent] = []
        start = 0
        scan = self._scan
        end = len(buf)
        has_line = self._has_line
        while True:
            if not has_line:
                # Skip empty lines before the event's first line: they stay in its raw bytes as a prefix.
                while scan < end and buf[scan] == 0x0A:
                    scan += 1
                if scan == end:
                    break
                has_line = True
            # From one byte back: the previous feed may have ended right after the LF that ends a line.
            found = buf.find(b"\n\n", scan - 1 if scan > start else scan)
            if found < 0:
                # The last byte may be the first LF of the pair: look at it again next time.
                scan = max(scan, end - 1)
                break
            stop = found + 2
            events.append(SSEEvent(buf[start:stop]))
            start = scan = stop
            has_line = False
        self._buf = buf[start:] if start else buf
        self._scan = scan - start
        self._has_line = has_line
        return events

    def _split_any_line_end(self, buf: bytes) -> list[SSEEvent]:
        events: list[SSEEvent] = []
        start = 0
        end = len(buf)
        pos = self._scan
        has_line = self._has_line
        if pos and buf[pos - 1] not in (0x0A, 0x0D):
            # The LF-only path can leave its scan position inside a line: back up to that line's start.
            pos = buf.rfind(b"\n", 0, pos) + 1
        while True:
            match = _LINE_END.search(buf, pos)
            if match is None:
                break
            if match.end() == end and buf[end - 1] == 0x0D:
                # A lone CR at the end of the input: an LF may follow and belong to the same line end.
                break
            if match.start() == pos:
                if has_line:
                    events.append(SSEEvent(buf[start : match.end()]))
                    start = match.end()
                    has_line = False
            else:
                has_line = True
            pos = match.end()
        self._buf = buf[start:] if start else buf
        self._scan = pos - start
        self._has_line = has_line
        return events


def encode_json_event(payload: Any) -> bytes:
    """`data: <json>\\n\\n` on one line: compact separators, non-ASCII kept as UTF-8 (JSON escapes every newline)."""
    return b"data: " + json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"


def encode_comment(text: str = "keep-alive") -> bytes:
    """A comment-only event; a multi-line text becomes one comment line per line."""
    lines = _TEXT_LINE_END.split(text)
    return "".join(f": {line}\n" for line in lines).encode() + b"\n"
