"""Students: config, NNX decoder, HF loading/saving, generation."""

from lark_jax.models.config import SUPPORTED_MODEL_TYPES, ModelConfig
from lark_jax.models.decoder import Decoder, KVCache
from lark_jax.models.generate import generate, generate_ids
from lark_jax.models.io import Student, load_student, save_student

__all__ = ["SUPPORTED_MODEL_TYPES", "Decoder", "KVCache", "ModelConfig", "Student",
           "generate", "generate_ids", "load_student", "save_student"]
