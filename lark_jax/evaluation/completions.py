"""Text in, text out: complete prompt strings with a student.

Tokenises the prompts, decodes with ``lark_jax.models.generate.generate_ids`` and
turns the new tokens back into text. The text-level stops (a complete
``\\boxed{...}``, stop strings: ``evaluation.stops``) live here, above the models
package, which only sees them as a ``stop(tokens)`` callable.
"""

from __future__ import annotations

from lark_jax.errors import LarkError
from lark_jax.evaluation.stops import TextStop
from lark_jax.models.generate import generate_ids


def generate(student, prompts: list[str], max_new_tokens: int = 64, temperature: float = 0.0,
             top_p: float = 1.0, seed: int = 0, *, batch_size: int = 32,
             progress=None, **options) -> list[str]:
    """Complete already-formatted prompt strings; returns the decoded continuations.

    Temperature 0 is greedy decoding; generation stops at the tokenizer's eos
    (or config.json's eos ids) or after ``max_new_tokens``. ``options`` are those of
    :func:`~lark_jax.models.generate.generate_ids` (``repetition_penalty``, ``keys``,
    ``chunk``); ``stop_at_boxed`` and ``stop_strings`` end a completion at its first
    complete ``\\boxed{...}`` or stop string and cut the text right after it.
    """
    if isinstance(prompts, str):
        raise LarkError("prompts must be a list of strings, not one string")
    tok = student.tokenizer
    if tok is None:
        raise LarkError("generation needs a tokenizer (load_student(..., tokenizer=True))")
    text_stop = TextStop(tok, boxed=options.pop("stop_at_boxed", False),
                         strings=options.pop("stop_strings", ()))
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    outs = generate_ids(student, ids, max_new_tokens, temperature, top_p, seed,
                        batch_size=batch_size, progress=progress,
                        stop=text_stop if text_stop.active else None, **options)
    return [text_stop.text(o) for o in outs]
