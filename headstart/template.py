"""Chat messages to token ids, and the parts of the next turn that are certain.

Everything is found by rendering the model's own chat template, never by assuming its
format: the entry is the common part of two renderings that differ only in the next
message's content, and correctness elsewhere rests on comparing token ids.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from transformers import PreTrainedTokenizerBase

Message = dict[str, Any]

_PLACEHOLDERS = ("\x01alpha placeholder", "\x02omega placeholder")


class TemplateError(ValueError):
    """The chat template cannot render what was asked (bad roles, tools unsupported...).

    ``param`` names the request field at fault, for the door's error answer.
    """

    def __init__(self, message: str, param: str = "messages") -> None:
        super().__init__(message)
        self.param = param


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two id sequences."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class ChatTemplate:
    """Renders conversations with a tokenizer's chat template."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        if not tokenizer.chat_template:
            raise TemplateError("the model has no chat template")
        self.tokenizer = tokenizer
        self.supports_tools = "tools" in tokenizer.chat_template
        end = tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.end_of_message = end if isinstance(end, int) and end >= 0 else tokenizer.eos_token_id

    def render(
        self,
        messages: Sequence[Message],
        *,
        generation_prompt: bool = True,
        tools: Sequence[dict[str, Any]] | None = None,
    ) -> list[int]:
        """Token ids of ``messages`` (plus the assistant's generation prompt)."""
        return list(self._apply(messages, generation_prompt, tools, tokenize=True)["input_ids"])

    def render_text(
        self,
        messages: Sequence[Message],
        *,
        generation_prompt: bool = True,
        tools: Sequence[dict[str, Any]] | None = None,
    ) -> str:
        """The text of ``messages`` as the template writes it (for finding what it puts where)."""
        return str(self._apply(messages, generation_prompt, tools, tokenize=False))

    def _apply(
        self,
        messages: Sequence[Message],
        generation_prompt: bool,
        tools: Sequence[dict[str, Any]] | None,
        *,
        tokenize: bool,
    ) -> Any:
        if tools and not self.supports_tools:
            raise TemplateError(
                "this model's chat template has no tool support, so a request with `tools` cannot be "
                "served; start headstart with a tool-capable model (--model qwen2.5-coder-0.5b)",
                param="tools",
            )
        try:
            return self.tokenizer.apply_chat_template(
                list(messages),
                tools=list(tools) if tools else None,
                add_generation_prompt=generation_prompt,
                tokenize=tokenize,
                return_dict=tokenize,
            )
        except Exception as exc:  # jinja raises many kinds for bad input
            raise TemplateError(f"the chat template cannot render these messages: {exc}") from exc

    def entry(
        self,
        messages: Sequence[Message],
        role: str = "user",
        tools: Sequence[dict[str, Any]] | None = None,
    ) -> list[int]:
        """Ids of ``messages`` followed by the tokens certain to open a ``role`` message.

        Rendering the conversation with two different placeholder contents for the next
        message and keeping the common part finds the closing of the last turn and the
        header of the next one, whatever the template looks like.
        """
        a, b = (
            self.render([*messages, {"role": role, "content": p}], generation_prompt=False, tools=tools)
            for p in _PLACEHOLDERS
        )
        return a[: common_prefix(a, b)]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))
