"""Evaluation: answer extraction, math equivalence, pass@k / ACC@k, the eval run."""

from lark_jax.evaluation.answers import extract_answer, is_equivalent, normalize_answer
from lark_jax.evaluation.bench import Benchmark, Problem, chat_prompts, load_benchmark
from lark_jax.evaluation.metrics import (
    acc_at_k,
    markdown_table,
    mean_pass_at_1,
    mean_pass_at_k,
    pass_at_k,
    summarize,
)
from lark_jax.evaluation.runner import EvalConfig, EvalResult, aggregate, run_eval

__all__ = ["Benchmark", "EvalConfig", "EvalResult", "Problem", "acc_at_k", "aggregate",
           "chat_prompts", "extract_answer", "is_equivalent", "load_benchmark",
           "markdown_table", "mean_pass_at_1", "mean_pass_at_k", "normalize_answer",
           "pass_at_k", "run_eval", "summarize"]
