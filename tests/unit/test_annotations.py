"""Injected texts: exact wording, number formatting, and removal that leaves everything else byte-identical."""

from __future__ import annotations

import itertools

import pytest

from router_app.annotations import (
    failed_line,
    format_seconds,
    loading_elsewhere_line,
    loading_line,
    may_contain_annotations,
    queued_line,
    ready_line,
    speed_footer,
    stopping_line,
    strip_annotations,
    switching_line,
    waiting_line,
    waking_line,
)


def test_switching_line() -> None:
    assert switching_line("Llama 3.3 70B") == "🔀 Switching to Llama 3.3 70B\n"


def test_waiting_line_singular_plural_and_elapsed() -> None:
    assert waiting_line(1, "qwen") == "⏳ Waiting for 1 running answer on qwen to finish\n"
    assert waiting_line(3, "qwen", 4) == "⏳ Waiting for 3 running answers on qwen to finish, 4.0 s elapsed\n"


def test_loading_line_with_and_without_estimate() -> None:
    assert loading_line("L", 2, 180) == "⏳ Loading L: 2.0 s elapsed, timeout 180 s\n"
    assert loading_line("L", 12.4, 600, 45.2) == "⏳ Loading L: 12 s elapsed, timeout 600 s, ~45 s expected\n"


def test_lines_of_the_other_waiting_phases_name_the_model_and_the_time() -> None:
    assert loading_elsewhere_line("Qwen", 3.25) == "⏳ Waiting for Qwen to finish loading, 3.2 s elapsed\n"
    assert stopping_line("Qwen", 12) == "⏳ Stopping Qwen, 12 s elapsed\n"
    assert queued_line("L", 0.5) == "⏳ Queued to load L, 0.5 s elapsed\n"


def test_ready_and_failed_lines_end_their_block_with_a_blank_line() -> None:
    assert ready_line("L", 47.3) == "✅ L ready in 47 s\n\n"
    assert ready_line("L", 3.14) == "✅ L ready in 3.1 s\n\n"
    assert failed_line("L", "unit exited\nline 2\n") == "❌ Loading L failed: unit exited | line 2\n\n"


def test_names_with_newlines_are_flattened() -> None:
    assert switching_line("a\nb") == "🔀 Switching to a | b\n"
    assert switching_line("") == "🔀 Switching to ?\n"


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0.0"), (-1, "0.0"), (0.04, "0.0"), (0.05, "0.1"), (9.94, "9.9"), (9.96, "10"), (10.4, "10"), (600, "600")],
)
def test_format_seconds(seconds: float, text: str) -> None:
    assert format_seconds(seconds) == text


@pytest.mark.parametrize(
    ("tokens", "seconds", "tps", "text"),
    [
        (512, 21.9, 23.38, "\n\n⚡ 23.4 tok/s (512 tokens in 21.9s)"),
        (1, 0.04, 25.0, "\n\n⚡ 25.0 tok/s (1 token in 0.0s)"),
        (100, 2.25, 44.44, "\n\n⚡ 44.4 tok/s (100 tokens in 2.2s)"),  # 2.25 is 2.2499… in binary
        (2000, 15.96, 125.26, "\n\n⚡ 125.3 tok/s (2000 tokens in 16.0s)"),
        (7, 1234.56, 0.0057, "\n\n⚡ 0.0 tok/s (7 tokens in 1234.6s)"),
    ],
)
def test_speed_footer_format_and_rounding(tokens: int, seconds: float, tps: float, text: str) -> None:
    assert speed_footer(tokens, seconds, tps) == text


STATUS_BLOCKS = [
    switching_line("Llama 3.3 70B") + loading_line("Llama 3.3 70B", 2, 600) + ready_line("Llama 3.3 70B", 3.5),
    waiting_line(2, "qwen-32b", 0.5)
    + waiting_line(1, "qwen-32b", 2.5)
    + switching_line("m")
    + loading_line("m", 2, 180, 12)
    + loading_line("m", 4, 180, 12)
    + ready_line("m", 5),
    loading_line("joined: m", 30, 180) + ready_line("joined: m", 31),
    ready_line("m (already loading)", 0.2),
    switching_line("Qwen vLLM") + waking_line("Qwen vLLM", 0.1, 180, 0.3) + ready_line("Qwen vLLM", 0.4),
    switching_line("m")
    + queued_line("m", 0.1)
    + loading_elsewhere_line("other, model", 1.5)
    + stopping_line("other, model", 2.5)
    + loading_line("m", 0.5, 180)
    + ready_line("m", 4),
]

ORIGINALS = [
    "",
    "Hello!",
    "\nStarts with a newline",
    "Ends with newlines\n\n",
    "⚡ The user likes emoji ⚡ and 🔀 and ✅",
    "🔀 Switching to plan B\nthe model's own words",
    "✅ Done\n\n❌ not done",
    "I measured ⚡ 23.4 tok/s (512 tokens in 21.9s) yesterday",  # not its own paragraph: the model's words
    "Code:\n```\nx = 1\n```\n",
    "\r\nwindows\r\n",
]


@pytest.mark.parametrize(("block", "original"), list(itertools.product(STATUS_BLOCKS, ORIGINALS)))
def test_status_block_round_trip(block: str, original: str) -> None:
    assert strip_annotations(block + original) == original


@pytest.mark.parametrize("original", ORIGINALS)
def test_footer_round_trip(original: str) -> None:
    assert strip_annotations(original + speed_footer(512, 21.9, 23.4)) == original


@pytest.mark.parametrize(("block", "original"), list(itertools.product(STATUS_BLOCKS, ORIGINALS)))
def test_status_and_footer_round_trip(block: str, original: str) -> None:
    assert strip_annotations(block + original + speed_footer(3, 0.5, 6.0)) == original


@pytest.mark.parametrize("original", ORIGINALS)
def test_text_without_annotations_is_untouched(original: str) -> None:
    assert strip_annotations(original) == original


def test_continued_answer_with_footer_and_status_block_in_the_middle() -> None:
    first, second = "First part.", " And the continuation."
    text = (
        STATUS_BLOCKS[0] + first + speed_footer(10, 1.0, 10.0) + STATUS_BLOCKS[1] + second + speed_footer(20, 2.0, 10.0)
    )
    assert strip_annotations(text) == first + second


def test_failed_switch_leaves_nothing() -> None:
    text = switching_line("m") + loading_line("m", 2, 180) + failed_line("m", "unit failed")
    assert strip_annotations(text) == ""


def test_cut_stream_of_only_progress_lines_is_removed() -> None:
    assert strip_annotations(switching_line("m") + loading_line("m", 2, 180)) == ""
    assert strip_annotations(switching_line("m").rstrip("\n")) == ""


def test_trimmed_final_line_is_still_recognised() -> None:
    assert strip_annotations((switching_line("m") + failed_line("m", "x")).rstrip()) == ""
    assert strip_annotations(speed_footer(1, 1.0, 1.0).lstrip()) == ""


def test_unclosed_status_lines_before_model_text_are_left_alone() -> None:
    # Without the closing "ready" line this could be the model's own text: never guess.
    text = switching_line("plan B") + "and here is why"
    assert strip_annotations(text) == text


def test_ready_lookalike_followed_by_more_text_on_the_next_line_is_left_alone() -> None:
    # Our ready line is always followed by a blank line; a model's checklist line is not.
    text = "✅ Server ready in 5 s\nNext, open the port."
    assert strip_annotations(text) == text


def test_status_lines_in_the_middle_are_left_alone() -> None:
    text = "Intro\n" + switching_line("m") + ready_line("m", 3)
    assert strip_annotations(text) == text


def test_footer_lookalikes_are_left_alone() -> None:
    for text in (
        "x\n\n⚡ 23.4 tok/s",
        "x\n\n⚡ 23 tok/s (512 tokens in 21.9s)",
        "x\n⚡ 23.4 tok/s (512 tokens in 21.9s)",
        "x\n\n⚡  23.4 tok/s (512 tokens in 21.9s)",
    ):
        assert strip_annotations(text) == text


def test_may_contain_annotations() -> None:
    assert not may_contain_annotations("plain text ✅ inside")
    assert may_contain_annotations("✅ at start")
    assert may_contain_annotations("footer ⚡ anywhere")


def test_waking_line() -> None:
    assert waking_line("Q", 0.12, 180, 0.3) == "⏳ Waking Q: 0.1 s elapsed, timeout 180 s, ~0.3 s expected\n"
