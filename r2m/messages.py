"""The text of TRL prompts and completions: plain strings, or conversations (lists of
{"role", "content"} messages whose content is a string or a list of typed parts)."""

from __future__ import annotations


def message_text(message: dict) -> str:
    """The text of one message: its string content, or the concatenated "text" of its parts."""
    content = message["content"]
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content if isinstance(part, dict))


def turn_text(prompt_or_completion, role: str | None = None) -> str:
    """A string unchanged; for a conversation, the text of its last message (of `role`, when
    given: "user" for a prompt's question, "assistant" for a completion)."""
    if isinstance(prompt_or_completion, str):
        return prompt_or_completion
    turns = [m for m in prompt_or_completion if role is None or m["role"] == role]
    if not turns:
        raise ValueError(f"the conversation has no {role!r} message")
    return message_text(turns[-1])
