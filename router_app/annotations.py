"""Every text the router writes into answers, and how to find it again to take it out of later requests.

Two kinds of text exist, both built only here:
- status lines, streamed while the client waits for a switch. They form one block at the very start of the
  answer's content (or reasoning) and end with `ready_line` or `failed_line`::

      🔀 Switching to Llama 3.3 70B
      ⏳ Waiting for 1 running answer on qwen-32b to finish, 4.0 s elapsed
      (or ⏳ Stopping X / ⏳ Waiting for X to finish loading / ⏳ Queued to load X, with the time elapsed)
      ⏳ Loading Llama 3.3 70B: 12 s elapsed, timeout 600 s, ~45 s expected   (or ⏳ Waking ...: a vLLM engine asleep)
      ✅ Llama 3.3 70B ready in 47 s
      <blank line, then the model's own text>

- the speed footer, a paragraph of its own appended after the model's text: `\\n\\n⚡ 23.4 tok/s (512 tokens in 21.9s)`.

Why this shape: clients store content and send it back on the next turn (Open-WebUI does), and the model must not
see our text. It comes back in three more shapes, each cleaned by its own function below:
- `strip_reasoning_details`: Open-WebUI before 0.12 (and imports, API clients) stored the reasoning channel as a
  `<details type="reasoning">` block of `> `-quoted lines inside the assistant's content;
- `strip_task_history`: Open-WebUI's background tasks (titles, tags, follow-ups) paste the conversation as text
  into a user message, `ASSISTANT: ...` lines between `<chat_history>` and `</chat_history>`;
- `reasoning_content` of an assistant message (its llama.cpp provider sends reasoning back): `strip_annotations`.

`strip_annotations` removes exactly what these functions produce, and nothing the user or model wrote, by
recognising each line's fixed emoji and phrasing, and only where the router puts it: status lines only as a block
at the start of the text (or right after one of our footers, where a "continue" request appends), and footers only
with their full format. A model answer that merely contains ⚡ or ✅ is left alone.
"""

from __future__ import annotations

import html
import re

SWITCH_MARK = "🔀"
WAIT_MARK = "⏳"
READY_MARK = "✅"
FAILED_MARK = "❌"
FOOTER_MARK = "⚡"

STATUS_MARKS = (SWITCH_MARK, WAIT_MARK, READY_MARK, FAILED_MARK)


def format_seconds(seconds: float) -> str:
    """Durations in status lines: one decimal below 10 s ("4.2"), whole seconds from there on ("47")."""
    seconds = max(0.0, seconds)
    if round(seconds, 1) < 10:
        return f"{seconds:.1f}"
    return f"{seconds:.0f}"


def _one_line(text: str) -> str:
    # A newline inside a model name or reason would split our line and break recognition; flatten it.
    return " | ".join(part.strip() for part in text.splitlines() if part.strip()) or "?"


def switching_line(model: str) -> str:
    """First status line of a switch: `🔀 Switching to X`."""
    return f"{SWITCH_MARK} Switching to {_one_line(model)}\n"


def waiting_line(running: int, active_model: str, elapsed: float | None = None) -> str:
    """The switch waits for answers still streaming from the active engine (the router never cuts one off)."""
    plural = "" if running == 1 else "s"
    line = f"{WAIT_MARK} Waiting for {running} running answer{plural} on {_one_line(active_model)} to finish"
    if elapsed is not None:
        line += f", {format_seconds(elapsed)} s elapsed"
    return line + "\n"


def loading_elsewhere_line(other_model: str, elapsed: float) -> str:
    """The switch waits behind requests for another model whose engine is loading now (they came first)."""
    return f"{WAIT_MARK} Waiting for {_one_line(other_model)} to finish loading, {format_seconds(elapsed)} s elapsed\n"


def stopping_line(model: str, elapsed: float) -> str:
    """An engine is being stopped (to make room, or to reload with new settings) before this one can start."""
    return f"{WAIT_MARK} Stopping {_one_line(model)}, {format_seconds(elapsed)} s elapsed\n"


def queued_line(model: str, elapsed: float) -> str:
    """The load waits for its turn: other requests came first and nothing runs for them yet."""
    return f"{WAIT_MARK} Queued to load {_one_line(model)}, {format_seconds(elapsed)} s elapsed\n"


def loading_line(model: str, elapsed: float, timeout: float, expected: float | None = None) -> str:
    """Progress while the engine loads; `expected` is the estimate from this model's previous load times."""
    return _progress_line("Loading", model, elapsed, timeout, expected)


def waking_line(model: str, elapsed: float, timeout: float, expected: float | None = None) -> str:
    """Progress while a sleeping engine (vLLM sleep mode) wakes up; `expected` from this model's previous wakes."""
    return _progress_line("Waking", model, elapsed, timeout, expected)


def _progress_line(verb: str, model: str, elapsed: float, timeout: float, expected: float | None) -> str:
    line = f"{WAIT_MARK} {verb} {_one_line(model)}: {format_seconds(elapsed)} s elapsed"
    line += f", timeout {format_seconds(timeout)} s"
    if expected is not None:
        line += f", ~{format_seconds(expected)} s expected"
    return line + "\n"


def ready_line(model: str, seconds: float) -> str:
    """Last status line of a successful switch; the blank line separates it from the model's own text."""
    return f"{READY_MARK} {_one_line(model)} ready in {format_seconds(seconds)} s\n\n"


def failed_line(model: str, reason: str) -> str:
    """Last status line of a failed switch (the in-band error event follows with the full details)."""
    return f"{FAILED_MARK} Loading {_one_line(model)} failed: {_one_line(reason)}\n\n"


def speed_footer(tokens: int, seconds: float, tokens_per_second: float) -> str:
    """The text to append to an answer: `\\n\\n⚡ 23.4 tok/s (512 tokens in 21.9s)`, one decimal each."""
    noun = "token" if tokens == 1 else "tokens"
    return f"\n\n{FOOTER_MARK} {tokens_per_second:.1f} tok/s ({tokens} {noun} in {seconds:.1f}s)"


# Recognition. Each pattern mirrors one builder above; a test round-trips every builder through strip_annotations.
_NUM = r"\d+(?:\.\d)?"
_TEXT = r"[^\r\n]+"
_PROGRESS_LINE = (
    rf"(?:{SWITCH_MARK} Switching to {_TEXT}"
    rf"|{WAIT_MARK} Waiting for \d+ running answers? on {_TEXT} to finish(?:, {_NUM} s elapsed)?"
    rf"|{WAIT_MARK} Waiting for {_TEXT} to finish loading, {_NUM} s elapsed"
    rf"|{WAIT_MARK} (?:Stopping|Queued to load) {_TEXT}, {_NUM} s elapsed"
    rf"|{WAIT_MARK} (?:Loading|Waking) {_TEXT}: {_NUM} s elapsed, timeout {_NUM} s(?:, ~{_NUM} s expected)?)"
)
_FINAL_LINE = rf"(?:{READY_MARK} {_TEXT} ready in {_NUM} s|{FAILED_MARK} Loading {_TEXT} failed: {_TEXT})"
# A block is progress lines closed by a final line; an unclosed block counts only when it is the whole text (the
# stream was cut during the switch). Requiring the closing line keeps a model's own "🔀 Switching to plan B" intact.
# A client that trimmed the text may have dropped the final newlines, hence the optional endings at the end.
_STATUS_BLOCK = re.compile(
    rf"\A(?:{_PROGRESS_LINE}\n)*{_FINAL_LINE}(?:\n\n|\n?\Z)"
    rf"|\A(?:{_PROGRESS_LINE}\n)*{_PROGRESS_LINE}\n?\Z"
)
_FOOTER = re.compile(rf"(?:\n\n|\A){FOOTER_MARK} \d+\.\d tok/s \(\d+ tokens? in \d+\.\d+s\)")


def may_contain_annotations(text: str) -> bool:
    """Cheap pre-check: False means `strip_annotations(text)` would return `text` unchanged."""
    return text.startswith(STATUS_MARKS) or FOOTER_MARK in text


def strip_annotations(text: str) -> str:
    """Remove status blocks and speed footers the router injected; everything else stays byte-identical."""
    if not may_contain_annotations(text):
        return text
    # Status blocks start the text or follow a footer (a "continue" request appends to an answer): split at
    # footers, which removes them, then drop a status block at the start of each piece.
    return "".join(_STATUS_BLOCK.sub("", piece, count=1) for piece in _FOOTER.split(text))


# Open-WebUI's serialisation of a reasoning block (open_webui/utils/middleware.py before 0.12): a `<details>` element,
# a `<summary>`, then every line of the reasoning prefixed with `> ` (html-escaped in some versions: `&gt; `).
_DETAILS_BLOCK = re.compile(
    r'<details type="reasoning"[^>]*>[ \t]*\n?[ \t]*<summary>[^<\n]*</summary>\n?(?P<body>.*?)</details>[ \t]*\n?',
    re.S,
)
_QUOTE = re.compile(r"\A(?:>|&gt;) ?")
_STATUS_LINE = re.compile(rf"\A{_PROGRESS_LINE}\Z")
_STATUS_FINAL_LINE = re.compile(rf"\A{_FINAL_LINE}\Z")


def strip_reasoning_details(text: str) -> str:
    """Remove our status lines from `<details type="reasoning">` blocks in an assistant's content.

    A block that holds only router status lines goes entirely; a block whose reasoning starts with our status block
    (a reasoning model behind a switch: both went into the reasoning channel) keeps the model's own lines. Anything
    else (a block of the model's own thoughts, a block that merely contains a ✅) stays byte-identical.
    """
    if "<details" not in text:
        return text
    return _DETAILS_BLOCK.sub(_clean_details_block, text)


def _clean_details_block(match: re.Match[str]) -> str:
    block = match.group(0)
    lines = match.group("body").split("\n")
    if lines and lines[-1].strip() == "":
        lines.pop()  # the newline before </details>
    unquoted = [html.unescape(_QUOTE.sub("", line, count=1)).rstrip("\r") for line in lines]
    consumed = 0
    while consumed < len(unquoted) and _STATUS_LINE.match(unquoted[consumed]):
        consumed += 1
    if consumed == 0 and not (unquoted and _STATUS_FINAL_LINE.match(unquoted[0])):
        return block
    if consumed < len(unquoted) and _STATUS_FINAL_LINE.match(unquoted[consumed]):
        consumed += 1
        while consumed < len(unquoted) and unquoted[consumed].strip() == "":
            consumed += 1  # the blank line our final line ends with
    elif consumed < len(unquoted):
        return block  # progress lines without their final line, followed by other text: not ours for sure
    if consumed >= len(unquoted):
        return ""
    body_start = match.start("body") - match.start()
    body_end = match.end("body") - match.start()
    kept = "\n".join(lines[consumed:]) + "\n"
    return block[:body_start] + kept + block[body_end:]


_HISTORY_SECTION = re.compile(r"(<chat_history>)(.*?)(</chat_history>)", re.S)
# Open-WebUI writes each turn as `ROLE: text` (open_webui/utils/misc.py get_messages_content), one after another.
_TURN_START = re.compile(r"^(?:USER|ASSISTANT|SYSTEM|TOOL|DEVELOPER): ", re.M)


def may_contain_task_history(text: str) -> bool:
    """Cheap pre-check for `strip_task_history`: a task prompt with any of our marks in it."""
    return "<chat_history>" in text and (FOOTER_MARK in text or any(mark in text for mark in STATUS_MARKS))


def strip_task_history(text: str) -> str:
    """Remove our texts from the assistant turns a task prompt pastes between `<chat_history>` tags.

    Only `ASSISTANT: ` turns inside those sections are cleaned, each exactly as an assistant message would be; the
    task's instructions, the user's turns and everything outside the sections stay byte-identical.
    """
    if not may_contain_task_history(text):
        return text
    return _HISTORY_SECTION.sub(_clean_history_section, text)


def _clean_history_section(match: re.Match[str]) -> str:
    section = match.group(2)
    starts = [turn.start() for turn in _TURN_START.finditer(section)]
    if not starts:
        return match.group(0)
    pieces = [section[: starts[0]]]
    for index, start in enumerate(starts):
        end = starts[index + 1] if index + 1 < len(starts) else len(section)
        turn = section[start:end]
        if turn.startswith("ASSISTANT: "):
            body = turn[len("ASSISTANT: ") :]
            trailing = body[len(body.rstrip("\n")) :]
            turn = "ASSISTANT: " + strip_annotations(strip_reasoning_details(body[: len(body) - len(trailing)]))
            turn += trailing
        pieces.append(turn)
    return match.group(1) + "".join(pieces) + match.group(3)
