"""Chat tokenization with the reference's assistant-span convention.

    full   = tokenize(chat_template(all messages))
    prompt = tokenize(chat_template(non-assistant messages, add_generation_prompt=True))
    span   = [len(prompt), len(full))            (after truncation of full to max_length)

Token j of the span is predicted by the logits at position j-1, so the
counted positions are [max(start, 1) - 1, end - 1).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from lark_jax.errors import LarkError


@dataclasses.dataclass(frozen=True)
class Tokenized:
    ids: np.ndarray  # int32 [n], truncated to max_length
    start: int  # first assistant token
    end: int  # one past the last assistant token (<= len(ids))

    @property
    def n_targets(self) -> int:
        """Number of assistant tokens that are predicted (and scored)."""
        return max(0, self.end - max(self.start, 1))


def render(tokenizer, messages, *, add_generation_prompt: bool = False) -> list[int]:
    text = tokenizer.apply_chat_template(list(messages), tokenize=False,
                                         add_generation_prompt=add_generation_prompt)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def tokenize_record(tokenizer, messages, max_length: int, where: str = "") -> Tokenized:
    """Token ids and the assistant span of one chat record (see module docstring)."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise LarkError("the tokenizer has no chat template", where=where or None)
    try:
        full = render(tokenizer, messages)
        prompt = render(tokenizer, [m for m in messages if m["role"] != "assistant"],
                        add_generation_prompt=True)
    except Exception as e:  # jinja errors from user templates
        raise LarkError(f"chat template failed: {e}", where=where or None) from None
    ids = np.asarray(full[:max_length], np.int32)
    return Tokenized(ids=ids, start=min(len(prompt), len(ids)), end=len(ids))
