"""Small helpers the stages share: turning dataset rows into TRL's formats."""

from __future__ import annotations

from typing import Any


def as_messages(role: str, text: str) -> list[dict[str, str]]:
    return [{"role": role, "content": text}]


def conversational(use_chat: bool, **fields: str) -> dict[str, Any]:
    """One TRL example: conversational (chat template applied by TRL) or plain strings.

    ``prompt`` becomes the user turn; every other field (completion, chosen, rejected) an assistant turn.
    """
    if not use_chat:
        return dict(fields)
    return {k: as_messages("user" if k == "prompt" else "assistant", v) for k, v in fields.items()}


def uses_chat_template(tokenizer: Any, wanted: bool) -> bool:
    return wanted and bool(getattr(tokenizer, "chat_template", None))
