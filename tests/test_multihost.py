"""Two real processes (jax.distributed, 4 CPU devices each) score one pool == one process."""

import json
import socket
import subprocess
import sys

import numpy as np
import pytest
from conftest import write_pool

CHILD = r"""
import sys
import jax
jax.config.update("jax_num_cpu_devices", 4)
from lark_jax.cli import main
sys.exit(main(sys.argv[1:]))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_merge_to_the_single_process_result(hf_students, tmp_path):
    d, _ = hf_students["qwen2_bias_tied"]
    pool = write_pool(tmp_path / "pool.jsonl", n_problems=5)
    common = ["score", "--pool", str(pool), "--student", str(d), "--top-k", "10",
              "--row-length", "128", "--batch-tokens", "1024", "-q"]
    single = subprocess.run([sys.executable, "-c", CHILD, *common, "--out",
                             str(tmp_path / "one.json")], capture_output=True, text=True)
    assert single.returncode == 0, single.stderr
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, *common, "--out",
                               str(tmp_path / "two.json"), "--coordinator", f"localhost:{port}",
                               "--num-processes", "2", "--process-id", str(i)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    a = json.loads((tmp_path / "one.json").read_text())
    b = json.loads((tmp_path / "two.json").read_text())
    assert (a["n_scored"], a["n_problems"]) == (b["n_scored"], b["n_problems"]) == (15, 5)
    for pid in a["scores"]:
        ca, cb = a["scores"][pid], b["scores"][pid]
        assert [c["candidate_id"] for c in ca] == [c["candidate_id"] for c in cb]
        np.testing.assert_allclose([c["g_hat"] for c in ca], [c["g_hat"] for c in cb], rtol=1e-5)
    assert not list(tmp_path.glob("*.partial*"))
