"""History cleaning: injected texts leave assistant turns, everything else stays byte-identical."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from router_app.annotations import loading_line, ready_line, speed_footer, switching_line, waiting_line
from router_app.history import clean_history

STATUS = (
    switching_line("Qwen 32B")
    + waiting_line(1, "llama", 1.5)
    + loading_line("Qwen 32B", 2, 180, 20)
    + ready_line("Qwen 32B", 21)
)
FOOTER = speed_footer(512, 21.9, 23.4)


def conversation(assistant_content: Any, **assistant_extra: Any) -> dict[str, Any]:
    return {
        "model": "qwen",
        "stream": True,
        "messages": [
            {"role": "system", "content": "⚡ Be fast. " + FOOTER},
            {"role": "user", "content": STATUS + "user pasted our status text ⚡" + FOOTER},
            {"role": "assistant", "content": assistant_content, **assistant_extra},
            {"role": "tool", "content": FOOTER, "tool_call_id": "t"},
            {"role": "user", "content": [{"type": "text", "text": STATUS + "x" + FOOTER}]},
        ],
    }


ANSWERS = ["Hello!", "", "⚡ the model likes emoji ✅", "\nleading newline", "trailing\n\n", "a\r\nb"]


@pytest.mark.parametrize("answer", ANSWERS)
@pytest.mark.parametrize(
    "inject",
    [
        lambda a: STATUS + a + FOOTER,
        lambda a: STATUS + a,
        lambda a: a + FOOTER,
    ],
    ids=["status+footer", "status", "footer"],
)
def test_round_trip_string_content(answer: str, inject: Any) -> None:
    original = conversation(answer)
    sent = conversation(inject(answer))
    snapshot = copy.deepcopy(sent)
    cleaned, changed = clean_history(sent)
    assert changed
    assert cleaned == original
    assert sent == snapshot  # input not mutated
    # Untouched messages are the very same objects: nothing else was rebuilt.
    for index in (0, 1, 3, 4):
        assert cleaned["messages"][index] is sent["messages"][index]


@pytest.mark.parametrize("answer", ANSWERS)
def test_round_trip_list_of_parts(answer: str) -> None:
    parts = [
        {"type": "text", "text": STATUS + answer},
        {"type": "image_url", "image_url": {"url": "data:,"}},
        {"type": "text", "text": answer + FOOTER},
        {"type": "text", "text": 5},
        "junk",
    ]
    expected = copy.deepcopy(parts)
    expected[0]["text"] = answer  # type: ignore[index]
    expected[2]["text"] = answer  # type: ignore[index]
    cleaned, changed = clean_history(conversation(parts))
    assert changed
    assert cleaned == conversation(expected)


@pytest.mark.parametrize("field", ["reasoning_content", "reasoning"])
def test_reasoning_fields_are_cleaned(field: str) -> None:
    sent = conversation("answer" + FOOTER, **{field: STATUS + "I think..."})
    cleaned, changed = clean_history(sent)
    assert changed
    assert cleaned == conversation("answer", **{field: "I think..."})


def test_only_reasoning_needs_cleaning() -> None:
    cleaned, changed = clean_history(conversation("plain", reasoning_content=STATUS))
    assert changed
    assert cleaned["messages"][2] == {"role": "assistant", "content": "plain", "reasoning_content": ""}


@pytest.mark.parametrize("answer", ANSWERS)
def test_clean_history_is_unchanged_and_not_copied(answer: str) -> None:
    body = conversation(answer, reasoning_content="thinking ⚡")
    cleaned, changed = clean_history(body)
    assert not changed
    assert cleaned is body


def test_tool_call_message_with_null_content() -> None:
    body = conversation(
        None, tool_calls=[{"id": "t", "type": "function", "function": {"name": "f", "arguments": "{}"}}]
    )
    assert clean_history(body) == (body, False)


@pytest.mark.parametrize(
    "body",
    [
        {"model": "m"},
        {"model": "m", "messages": "not a list"},
        {"model": "m", "messages": ["junk", 3, None, {"content": FOOTER}]},
        {"model": "m", "prompt": "completion prompt" + FOOTER},
    ],
)
def test_odd_bodies_pass_through(body: dict[str, Any]) -> None:
    assert clean_history(body) == (body, False)


def test_many_assistant_turns_each_cleaned() -> None:
    body = {
        "model": "m",
        "messages": [
            {"role": "user", "content": "q1"},
            {"role": "assistant", "content": STATUS + "a1" + FOOTER},
            {"role": "user", "content": "q2"},
            {"role": "assistant", "content": "a2" + FOOTER},
            {"role": "user", "content": "q3"},
        ],
    }
    cleaned, changed = clean_history(body)
    assert changed
    assert [m["content"] for m in cleaned["messages"]] == ["q1", "a1", "q2", "a2", "q3"]


def test_cleaned_body_serialises_with_identical_strings() -> None:
    answer = 'Ünïcödé ⚡ answer\twith "quotes"'
    cleaned, _ = clean_history(conversation(STATUS + answer + FOOTER))
    assert json.dumps(cleaned, ensure_ascii=False) == json.dumps(conversation(answer), ensure_ascii=False)


def details(reasoning: str, quote: str = "> ") -> str:
    """An assistant's reasoning as Open-WebUI before 0.12 stored it in the content (utils/middleware.py)."""
    body = "\n".join(quote + line for line in reasoning.splitlines())
    head = '\n<details type="reasoning" done="true" duration="21">\n<summary>Thought for 21 seconds</summary>\n'
    return f"{head}{body}\n</details>\n"


@pytest.mark.parametrize("quote", ["> ", "&gt; ", ">"])
def test_details_block_of_only_status_lines_is_removed(quote: str) -> None:
    cleaned, changed = clean_history(conversation(details(STATUS, quote) + "Hello!" + FOOTER))
    assert changed
    assert cleaned["messages"][2]["content"] == "\nHello!"


def test_details_block_starting_with_status_keeps_the_models_reasoning() -> None:
    sent = conversation(details(STATUS + "I think ✅\nso I answer") + "Hello!")
    cleaned, changed = clean_history(sent)
    assert changed
    assert cleaned["messages"][2]["content"] == details("I think ✅\nso I answer") + "Hello!"


@pytest.mark.parametrize(
    "reasoning",
    [
        "The model's own thoughts ⚡ ✅",
        "✅ Llama ready in the morning",  # resembles a final line, is not one
        switching_line("Qwen 32B") + "and then the model's thoughts, no final line",
        "thoughts first\n" + STATUS,  # our block only ever starts the reasoning
    ],
)
def test_details_blocks_not_ours_stay_byte_identical(reasoning: str) -> None:
    body = conversation(details(reasoning) + "answer")
    assert clean_history(body) == (body, False)


def task_prompt(history: str) -> str:
    """An Open-WebUI task prompt (open_webui/config.py templates, utils/misc.py get_messages_content)."""
    return (
        "### Task:\nGenerate a concise title. ⚡ Be quick.\n### Chat History:\n"
        f"<chat_history>\n{history}\n</chat_history>\n" + FOOTER
    )


def test_task_prompt_history_is_cleaned_in_assistant_turns_only() -> None:
    user_turn = "USER: " + STATUS + "I pasted this" + FOOTER
    sent_history = (
        f"{user_turn}\nASSISTANT: {(STATUS + 'first answer' + FOOTER).strip()}\n"
        f"USER: thanks\nASSISTANT: second answer{FOOTER}"
    )
    expected_history = f"{user_turn}\nASSISTANT: first answer\nUSER: thanks\nASSISTANT: second answer"
    for content in (task_prompt(sent_history), [{"type": "text", "text": task_prompt(sent_history)}]):
        body = {"model": "m", "messages": [{"role": "user", "content": content}]}
        cleaned, changed = clean_history(body)
        assert changed
        got = cleaned["messages"][0]["content"]
        text = got if isinstance(got, str) else got[0]["text"]
        assert text == task_prompt(expected_history), "outside <chat_history> and user turns stay as they were"


def test_task_prompt_status_only_answer_and_multiline_answers() -> None:
    sent = f"USER: q\nASSISTANT: {STATUS.strip()}\nUSER: q2\nASSISTANT: line 1\nline 2 ✅ done{FOOTER}"
    body = {"model": "m", "messages": [{"role": "user", "content": task_prompt(sent)}]}
    cleaned, _ = clean_history(body)
    expected = "USER: q\nASSISTANT: \nUSER: q2\nASSISTANT: line 1\nline 2 ✅ done"
    assert cleaned["messages"][0]["content"] == task_prompt(expected)


@pytest.mark.parametrize(
    "history",
    [
        "USER: q\nASSISTANT: ⚡ 23.4 tok/s is fast, said the model",  # resembles a footer, is not one
        "USER: q\nASSISTANT: speed was\n⚡ 23.4 tok/s (512 tokens in 21.9s)",  # one newline: not our paragraph
        "USER: q\nASSISTANT: 🔀 Switching to plan B\nthen more",  # no closing line: the model's text
    ],
)
def test_task_prompt_text_that_resembles_ours_stays(history: str) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": task_prompt(history)}]}
    assert clean_history(body) == (body, False)


def test_user_text_without_a_task_section_is_never_touched() -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "ASSISTANT: x" + FOOTER + "<chat_history>"}]}
    assert clean_history(body) == (body, False)
