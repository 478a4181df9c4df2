"""lark-jax: LARK learnability-grounded trajectory selection in JAX / Flax NNX."""

from lark_jax._version import __version__
from lark_jax.errors import LarkError
from lark_jax.evaluation.completions import generate
from lark_jax.models import (
    Decoder,
    ModelConfig,
    Student,
    generate_ids,
    load_student,
    save_student,
)

__all__ = ["Decoder", "LarkError", "ModelConfig", "Student", "generate", "generate_ids",
           "load_student", "save_student", "__version__"]
