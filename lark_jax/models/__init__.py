"""Students: config, NNX decoder, HF loading/saving, token-level generation.

Text-level generation (prompt strings in, completions out) is
``evaluation.completions.generate`` (a layer above): it needs the evaluation's text stops.
"""

from lark_jax.models.config import SUPPORTED_MODEL_TYPES, ModelConfig
from lark_jax.models.decoder import Decoder, KVCache
from lark_jax.models.generate import generate_ids
from lark_jax.models.io import Student, load_student, save_student
from lark_jax.models.params import count_params

__all__ = ["SUPPORTED_MODEL_TYPES", "Decoder", "KVCache", "ModelConfig", "Student",
           "count_params", "generate_ids", "load_student", "save_student"]
