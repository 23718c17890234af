"""Prompt formats for local models: the GGUF's own chat template for instruction-tuned models, and a few-shot
Question/Answer completion prompt for base models (Gemma 3 270M is one: its chat template gets nonsense)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from local_models.errors import Unsupported


@dataclass(frozen=True)
class Prompt:
    """Text to complete, the stop strings its format needs, and whether it already holds the BOS token."""

    text: str
    stop: tuple[str, ...] = ()
    has_bos: bool = False


def message_text(message: Mapping[str, Any]) -> str:
    """A message's text; content parts other than text (images, audio) cannot go to a local model."""
    content = message.get("content")
    if content is None or isinstance(content, str):
        return content or ""
    parts = []
    for part in content:
        if not isinstance(part, Mapping) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise Unsupported("non-text content parts")
        parts.append(part["text"])
    return "".join(parts)


def plain_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, str]]:
    """Messages as {role, content} text; tool turns are refused (local tiers do not call tools)."""
    out = []
    for message in messages:
        role = message.get("role")
        if role in ("tool", "function") or message.get("tool_calls") or message.get("function_call"):
            raise Unsupported("tool turns")
        out.append({"role": "system" if role == "developer" else str(role), "content": message_text(message)})
    return out


class ChatTemplate:
    """The model's chat template (from the GGUF metadata), rendered with Jinja as llama.cpp does."""

    def __init__(self, template: str, bos_token: str, eos_token: str) -> None:
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        self._formatter = Jinja2ChatFormatter(template=template, eos_token=eos_token, bos_token=bos_token)
        self._eos = eos_token

    def chat(self, messages: Sequence[Mapping[str, Any]]) -> Prompt:
        """The prompt for a conversation, ending with the assistant's turn opened."""
        try:
            result = self._formatter(messages=plain_messages(messages))  # type: ignore[arg-type]
        except Exception as exc:  # template errors (e.g. a role it refuses): not a request for this model
            raise Unsupported(f"chat template refused the messages: {exc}") from exc
        return Prompt(result.prompt, (self._eos,) if self._eos else (), has_bos=True)

    def text(self, prompt: str) -> Prompt:
        """A legacy completion prompt goes in as it is."""
        return Prompt(prompt)


# Mixed examples (facts, arithmetic) so a base model answers in the same short form whatever the question.
FEW_SHOT = (
    ("What is the capital of France?", "Paris"),
    ("Who wrote the play Romeo and Juliet?", "William Shakespeare"),
    ("Sam has 3 apples and buys 4 more. How many apples does Sam have now?", "7"),
    ("In which year did the Second World War end?", "1945"),
    ("A box holds 12 eggs. How many eggs are in 3 boxes?", "36"),
)


class FewShot:
    """A Question/Answer prompt for base models: a few worked examples, then the conversation's turns."""

    stop = ("\n", "Question:")

    def chat(self, messages: Sequence[Mapping[str, Any]]) -> Prompt:
        lines = []
        turns = plain_messages(messages)
        for turn in turns:
            if turn["role"] == "system" and turn["content"]:
                lines.append(turn["content"].strip() + "\n")
        for question, answer in FEW_SHOT:
            lines.append(f"Question: {question}\nAnswer: {answer}\n")
        for turn in turns:
            text = " ".join(turn["content"].split())
            if turn["role"] == "user":
                lines.append(f"Question: {text}\n")
            elif turn["role"] == "assistant":
                lines.append(f"Answer: {text}\n")
        if not turns or turns[-1]["role"] != "user":
            raise Unsupported("the conversation does not end with a user turn")
        return Prompt("\n".join(lines).rstrip("\n") + "\nAnswer:", self.stop)

    def text(self, prompt: str) -> Prompt:
        return Prompt(prompt)
