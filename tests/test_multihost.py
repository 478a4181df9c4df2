"""Real processes on localhost (jax.distributed, gloo CPU collectives): 2 processes x 4
devices give one process's results for score, train (plain and FSDP) and eval; a killed
process stops its peer; runs resume across process and device counts."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import write_pool, write_selection

# The CLI in a child process with LARK_TEST_DEVICES simulated CPU devices (default 4);
# with LARK_TEST_KILL_AFTER=N the process SIGKILLs itself once step N's loss is known.
CHILD = r"""
import os, signal, sys
import jax
jax.config.update("jax_num_cpu_devices", int(os.environ.get("LARK_TEST_DEVICES", "4")))
kill_after = int(os.environ.get("LARK_TEST_KILL_AFTER", "0"))
term_after = int(os.environ.get("LARK_TEST_TERM_AFTER", "0"))
if kill_after or term_after:
    import time
    import lark_jax.training.loop as loop
    real = loop.run_steps
    def run_steps(tr, items, on_done, **kw):
        def done(step, *a):
            on_done(step, *a)
            if step + 1 == kill_after:
                os.kill(os.getpid(), signal.SIGKILL)
            if step + 1 == term_after:  # a preemption notice, as a scheduler sends it
                os.kill(os.getpid(), signal.SIGTERM)
            if term_after and step + 1 >= term_after:
                # Give the hosts' agreement on a safe step time to finish before the run
                # does (at 0.5 s a clean-clone CI run once agreed only on the last step).
                time.sleep(1.0)
        return real(tr, items, done, **kw)
    loop.run_steps = run_steps
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
    for name in ("two.json", "two.parquet"):  # the parquet is built from every sidecar
        port = free_port()
        procs = [subprocess.Popen([sys.executable, "-c", CHILD, *common, "--out",
                                   str(tmp_path / name), "--coordinator", f"localhost:{port}",
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
    from lark_jax.selection import load_scores

    ta = load_scores(tmp_path / "one.json", need=("g_hat",))
    tc = load_scores(tmp_path / "two.parquet", need=("g_hat",))
    assert tc.header["n_scored"] == 15 and tc.header["n_problems"] == 5
    assert ta.problem_ids.tolist() == tc.problem_ids.tolist()
    assert ta.candidate_ids.tolist() == tc.candidate_ids.tolist()
    np.testing.assert_allclose(tc.fields["g_hat"], ta.fields["g_hat"], rtol=1e-5)
    assert not list(tmp_path.glob("*.partial*"))


def launch(args, n_proc=2, devices=4, env_for=None, args_for=None):
    """Start the CLI as ``n_proc`` processes of one run (or one plain process).

    ``env_for`` / ``args_for``: {process id: extra environment / arguments}.
    """
    base = {**os.environ, "LARK_TEST_DEVICES": str(devices)}
    if n_proc == 1:
        return [subprocess.Popen([sys.executable, "-c", CHILD, *args], env=base,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)]
    port = free_port()
    return [subprocess.Popen([sys.executable, "-c", CHILD, *args,
                              *(args_for or {}).get(i, []), "--coordinator",
                              f"localhost:{port}", "--num-processes", str(n_proc),
                              "--process-id", str(i), "--heartbeat-timeout", "5"],
                             env={**base, **(env_for or {}).get(i, {})},
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for i in range(n_proc)]


def finish(procs, timeout=600):
    outs = [p.communicate(timeout=timeout) for p in procs]
    return [p.returncode for p in procs], [o[1] for o in outs]


def run_ok(args, **kw):
    rcs, errs = finish(launch(args, **kw))
    assert rcs == [0] * len(rcs), [e[-3000:] for e in errs]


def losses(run_dir):
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return np.array([[r["step"], r["loss"], r["grad_norm"], r["tokens"]] for r in rows])


def weights(run_dir):
    from safetensors.numpy import load_file

    return load_file(str(run_dir / "final" / "model.safetensors"))


def assert_same_run(a, b):
    la, lb = losses(a), losses(b)
    assert la.shape == lb.shape and (la[:, 0] == lb[:, 0]).all() and (la[:, 3] == lb[:, 3]).all()
    np.testing.assert_allclose(lb[:, 1:3], la[:, 1:3], rtol=1e-5)
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        np.testing.assert_allclose(wb[k], wa[k], atol=1e-6, rtol=0, err_msg=k)


@pytest.fixture(scope="module")
def train_case(hf_students, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mh_train")
    d, _ = hf_students["qwen2_bias_tied"]
    pool = write_pool(tmp / "pool.jsonl", n_problems=8)
    sel = write_selection(tmp / "train.jsonl", pool, weights=[0.2, 1.0, 2.5])
    args = ["train", "--student", str(d), "--data", str(sel), "--batch-size", "8",
            "--max-steps", "6", "--lr", "1e-3", "--micro-batch-tokens", "1024",
            "--max-length", "512", "--save-every", "2", "--keep", "5", "-q"]
    return tmp, args


@pytest.fixture(scope="module")
def one_process_run(train_case):
    """The reference: one process with 8 devices, data parallel."""
    tmp, args = train_case
    run_ok(args + ["--out", str(tmp / "one")], n_proc=1, devices=8)
    return tmp / "one"


@pytest.mark.slow
@pytest.mark.parametrize("fsdp", [False, True], ids=["data-parallel", "fsdp"])
def test_train_two_processes_equal_one(train_case, one_process_run, fsdp):
    """2 x 4 devices == 1 x 8 (FSDP computes the same step as data parallelism, so both
    are checked against the one data-parallel reference run)."""
    tmp, args = train_case
    two = tmp / ("two_fsdp" if fsdp else "two")
    run_ok(args + ["--out", str(two)] + (["--fsdp"] if fsdp else []))
    assert_same_run(one_process_run, two)
    assert json.loads((two / "run_config.json").read_text())["processes"] == 2
    if fsdp:
        return
    # The 2 x 4 checkpoint of step 4 resumes on 1 process x 8 devices and on 1 device.
    for n_dev in (8, 1):
        again = tmp / f"again_{n_dev}"
        shutil.copytree(two, again)
        shutil.rmtree(again / "final")
        shutil.rmtree(again / "checkpoints" / "6")
        run_ok(args + ["--out", str(again), "--resume"], n_proc=1, devices=n_dev)
        assert_same_run(one_process_run, again)


@pytest.mark.slow
def test_killed_process_stops_its_peer_and_both_resume(train_case, one_process_run):
    tmp, args = train_case
    run = tmp / "killed"
    t0 = time.monotonic()
    procs = launch(args + ["--out", str(run), "--save-every", "1"],
                   env_for={1: {"LARK_TEST_KILL_AFTER": "3"}})
    rcs, errs = finish(procs, timeout=120)
    assert rcs[1] == -signal.SIGKILL
    assert rcs[0] != 0 and time.monotonic() - t0 < 100, "the survivor must not hang"
    assert "stopped sending heartbeats" in errs[0], errs[0][-2000:]
    run_ok(args + ["--out", str(run), "--save-every", "1", "--resume"])
    assert_same_run(one_process_run, run)


@pytest.mark.slow
def test_preempted_processes_save_the_same_step_and_resume(train_case, one_process_run):
    """SIGTERM on one host: every host saves the agreed step, stops with one line, and
    --resume on both reaches the uninterrupted run's result."""
    tmp, args = train_case
    run = tmp / "preempted"
    i = args.index("--save-every")
    plain = args[:i] + args[i + 2:]  # no regular checkpoints: only the preemption's
    rcs, errs = finish(launch(plain + ["--out", str(run)],
                              env_for={0: {"LARK_TEST_TERM_AFTER": "2"}}), timeout=180)
    assert rcs == [2, 2], [e[-2000:] for e in errs]
    saved = sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
    assert len(saved) == 1 and 2 < saved[0] < 6, saved
    for e in errs:
        assert f"preempted (SIGTERM): every process stopped after step {saved[0]}" in e
        assert "Traceback" not in e
    run_ok(plain + ["--out", str(run), "--resume"])
    assert_same_run(one_process_run, run)


@pytest.mark.slow
def test_eval_two_processes_equal_one(tmp_path):
    from lark_jax.models.tiny import make_tiny_student

    d = make_tiny_student(tmp_path / "tiny", "qwen2")
    bench = tmp_path / "bench.jsonl"
    bench.write_text("".join(json.dumps({"prompt": f"What is {i} + {i}?", "answer": str(2 * i)})
                             + "\n" for i in range(5)))
    args = ["eval", "--model", str(d), "--benchmark", str(bench), "--samples", "3",
            "--temperature", "1.0", "--max-new-tokens", "8", "--batch-size", "4", "-q"]
    run_ok(args + ["--out", str(tmp_path / "one")], n_proc=1)
    run_ok(args + ["--out", str(tmp_path / "two")])

    def rows(run):
        return sorted((json.loads(x) for x in (run / "generations.jsonl").read_text()
                       .splitlines()), key=lambda r: (r["problem"], r["sample"]))
    one = json.loads((tmp_path / "one" / "summary.json").read_text())
    two = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert len(rows(tmp_path / "one")) == 15 and rows(tmp_path / "one") == rows(tmp_path / "two")
    assert one == two
    assert not list((tmp_path / "two").glob("generations.p*"))


def test_bad_cluster_options_fail_clearly(tmp_path):
    common = [sys.executable, "-c", CHILD, "eval", "--model", "x", "--benchmark", "y",
              "--out", str(tmp_path / "o")]
    bench = tmp_path / "b.jsonl"
    bench.write_text(json.dumps({"prompt": "1+1?", "answer": "2"}) + "\n")
    common[common.index("y")] = str(bench)
    p = subprocess.run(common + ["--coordinator", "localhost:1", "--num-processes", "2",
                                 "--process-id", "2"], capture_output=True, text=True)
    assert p.returncode != 0 and "--process-id must be in 0..1" in p.stderr
    assert "Traceback" not in p.stderr
    # Nobody listens at the coordinator's port: a clear error once --init-timeout passes.
    t0 = time.monotonic()
    p = subprocess.run(common + ["--coordinator", f"localhost:{free_port()}", "--num-processes",
                                 "2", "--process-id", "1", "--init-timeout", "3"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and "could not join the run" in p.stderr, p.stderr[-2000:]
    assert "Traceback" not in p.stderr and time.monotonic() - t0 < 60


@pytest.mark.slow
def test_processes_started_with_different_settings_are_refused(train_case):
    tmp, args = train_case
    rcs, errs = finish(launch(args + ["--out", str(tmp / "mixed")],
                              args_for={1: ["--lr", "2e-3"]}), timeout=120)
    assert rcs == [2, 2], [e[-2000:] for e in errs]
    assert "process 1 was started with other train settings than process 0 (--lr: 0.001 != " \
           "0.002)" in errs[1]
    assert "process(es) 1 were started with other train settings" in errs[0]
    assert not any("Traceback" in e for e in errs)
    assert not (tmp / "mixed" / "checkpoints").exists()
