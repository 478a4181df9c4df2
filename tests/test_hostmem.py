"""lark_jax.hostmem: glibc's allocator is tuned only where JAX runs on the CPU."""

import os
import subprocess
import sys

import pytest

from lark_jax.hostmem import cpu_only


@pytest.mark.parametrize("platforms, expected", [("cpu", True), (" cpu ", True),
                                                 ("cuda", False), ("cuda,cpu", False),
                                                 ("tpu", False)])
def test_cpu_only_follows_jax_platforms(monkeypatch, platforms, expected):
    monkeypatch.setenv("JAX_PLATFORMS", platforms)
    assert cpu_only() is expected


def _tune(env: dict, force: bool) -> str:
    code = ("from lark_jax.hostmem import tune_cpu_malloc; "
            f"print(tune_cpu_malloc(force={force}), tune_cpu_malloc(force={force}))")
    return subprocess.run([sys.executable, "-c", code], env={**os.environ, **env},
                          capture_output=True, text=True, check=True).stdout.strip()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_tuned_on_a_cpu_and_left_alone_for_an_accelerator():
    assert _tune({"JAX_PLATFORMS": "cpu"}, False) == "True True"  # idempotent
    assert _tune({"JAX_PLATFORMS": "cuda"}, False) == "False False"
    assert _tune({"JAX_PLATFORMS": "cuda"}, True) == "True True"
