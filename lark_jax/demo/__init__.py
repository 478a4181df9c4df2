"""The embedded default: a tiny student and a multi-teacher reasoning task, end to end.

``run_demo(out_dir, quick=True)`` builds (or loads from the cache) a small student and the
synthetic arithmetic task, scores the pool with LARK, selects with LARK and the baselines at
the same budget, fine-tunes one student per method for the same number of steps, evaluates
them on the held-out benchmark and writes a results table and the paper's diagnostics.
"""

from lark_jax.demo.config import METHODS, DemoConfig, demo_config
from lark_jax.demo.pipeline import DemoResult, run_demo
from lark_jax.demo.student import StudentRecipe, build_student, cache_root
from lark_jax.demo.task import TEACHERS, Task, TaskConfig, build_task

__all__ = ["METHODS", "TEACHERS", "DemoConfig", "DemoResult", "StudentRecipe", "Task",
           "TaskConfig", "build_student", "build_task", "cache_root", "demo_config", "run_demo"]
