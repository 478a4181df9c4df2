"""JAX's persistent compilation cache, on by default for every command.

Why: a command compiles the same few programs on every run (the shapes come from the one
bucketing rule in ``shapes``), and on a card that costs 13-26 s before the first batch.
With the compiled executables on disk, a second run with the same settings loads them
instead of compiling.

Where: ``JAX_COMPILATION_CACHE_DIR`` if set (JAX's own variable wins), else
``$LARK_JAX_CACHE/compile`` with ``LARK_JAX_CACHE`` defaulting to ``~/.cache/lark-jax``.

What is stored: every program, however quick its compile (JAX's defaults keep only
programs that took over 1 s to compile, which on a CPU is none of ours, and let it raise
the size floor per file system); a user's own ``JAX_PERSISTENT_CACHE_MIN_*`` settings
win. The cache holds executables that a later run will execute: keep it private (JAX's
own warning; never share the directory with untrusted users).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from lark_jax.errors import LarkError

ROOT_ENV = "LARK_JAX_CACHE"
JAX_DIR_ENV = "JAX_COMPILATION_CACHE_DIR"
SUBDIR = "compile"
# (jax option, value we set, the environment variable that overrides it)
_THRESHOLDS = (
    ("jax_persistent_cache_min_compile_time_secs", 0.0,
     "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"),
    # -1: no size floor, and JAX may not raise it behind our back.
    ("jax_persistent_cache_min_entry_size_bytes", -1, "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"),
)
_OPTIONS = ("jax_enable_compilation_cache", "jax_compilation_cache_dir",
            *(name for name, _, _ in _THRESHOLDS))


def cache_root() -> Path:
    """``$LARK_JAX_CACHE``, else ``~/.cache/lark-jax`` (an empty value counts as unset)."""
    root = os.environ.get(ROOT_ENV)
    return Path(root).expanduser() if root else Path.home() / ".cache" / "lark-jax"


def compile_cache_dir() -> Path:
    """The compiled programs' directory: ``$JAX_COMPILATION_CACHE_DIR`` else
    ``cache_root()/compile``."""
    own = os.environ.get(JAX_DIR_ENV)
    return Path(own).expanduser() if own else cache_root() / SUBDIR


@contextlib.contextmanager
def compile_cache(enabled: bool = True):
    """Run the body with the persistent compilation cache on (or off), then restore.

    Yields the directory in use, or None when ``enabled`` is False (then no cache is
    read or written, even with ``JAX_COMPILATION_CACHE_DIR`` set). Must be entered before
    the body compiles anything. The previous JAX settings come back on exit, so a
    program that calls the CLI in-process (the tests do) is not left writing every
    later compile to the directory.
    """
    import jax
    from jax.experimental.compilation_cache import compilation_cache as cc

    saved = {name: getattr(jax.config, name) for name in _OPTIONS}
    path = None
    if enabled:
        path = compile_cache_dir()
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise LarkError(f"compile cache {path}: cannot create the directory ({e}); set "
                            f"{ROOT_ENV} elsewhere or pass --no-compile-cache") from None
    try:
        jax.config.update("jax_enable_compilation_cache", enabled)
        if enabled:
            jax.config.update("jax_compilation_cache_dir", str(path))
            for name, value, env in _THRESHOLDS:
                if env not in os.environ:
                    jax.config.update(name, value)
        cc.reset_cache()  # JAX opens its cache once per process: make it see this directory
        yield path
    finally:
        for name, value in saved.items():
            jax.config.update(name, value)
        cc.reset_cache()
