"""Reliability: SIGKILL and resume with real processes, no writes through links, atomic
outputs, and numerical safety of bf16 students with extreme activations."""

import json
import signal
import subprocess
import sys
import time

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import Preempted, one_device, preempt_at, write_pool, write_selection

import lark_jax
from lark_jax import LarkError, fsio
from lark_jax.cli import main as cli_main
from lark_jax.learnability.kernel import token_stats
from lark_jax.learnability.runner import ScoreConfig, score_pool
from lark_jax.models.tiny import make_tiny_student
from lark_jax.training.trainer import TrainConfig, train

WEIGHTS = (0.5, 1.0, 2.0)


def cli(*args):
    # The child sees one CPU device (the 8-device setting is this process's JAX config).
    return [sys.executable, "-m", "lark_jax", *map(str, args)]


def spawn(cmd, tmp_path) -> subprocess.Popen:
    """Start ``cmd`` with its output in a file (an undrained pipe could block the child)."""
    log = open(tmp_path / "child.log", "wb")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    proc.log_path = tmp_path / "child.log"
    log.close()
    return proc


def kill_when(proc: subprocess.Popen, ready, timeout: float = 600) -> None:
    """SIGKILL ``proc`` as soon as ``ready()`` holds; fail if it finishes first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return
        if proc.poll() is not None:
            raise AssertionError("the run finished before it could be killed:\n"
                                 + proc.log_path.read_text(errors="replace"))
        time.sleep(0.01)
    proc.kill()
    raise AssertionError("timed out waiting for the run to make progress")


def n_lines(path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


# -- SIGKILL, then --resume ---------------------------------------------------------------


@pytest.mark.slow  # a killed subprocess and its rerun: the slow tier
def test_sigkill_during_score_then_resume_equals_uninterrupted(hf_students, tmp_path):
    d, _ = hf_students["qwen2_bias_tied"]
    pool = write_pool(tmp_path / "pool.jsonl", n_problems=30)
    flags = ["--top-k", 10, "--row-length", 128, "--batch-tokens", 256, "-q"]
    out = tmp_path / "scores.json"
    side = tmp_path / "scores.json.partial.jsonl"
    proc = spawn(cli("score", "--pool", pool, "--student", d, "--out", out, *flags), tmp_path)
    kill_when(proc, lambda: n_lines(side) >= 1 + 6)  # header + at least three batches
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists() and side.exists()
    n_before = n_lines(side) - 1
    assert 0 < n_before < 90

    r = subprocess.run(cli("score", "--pool", pool, "--student", d, "--out", out, *flags),
                       capture_output=True, text=True)
    assert r.returncode != 0 and "--resume" in r.stderr and "Traceback" not in r.stderr
    flags.remove("-q")
    r = subprocess.run(cli("score", "--pool", pool, "--student", d, "--out", out, *flags,
                           "--resume"), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert not side.exists()
    # The rows written before the kill were reused, not recomputed.
    assert f"{n_before} resumed" in r.stdout, r.stdout

    s = lark_jax.load_student(d, mesh=one_device())
    score_pool(s, pool, tmp_path / "ref.json",
               ScoreConfig(top_k=10, row_length=128, batch_tokens=256))
    want = json.loads((tmp_path / "ref.json").read_text())
    got = json.loads(out.read_text())
    assert got["n_scored"] == want["n_scored"] == 90
    assert got["scores"].keys() == want["scores"].keys()
    for pid, rows in want["scores"].items():
        ids = [c["candidate_id"] for c in got["scores"][pid]]
        assert ids == [c["candidate_id"] for c in rows] and len(set(ids)) == len(ids)
        for a, b in zip(got["scores"][pid], rows, strict=True):
            assert a["tokens"] == b["tokens"]
            np.testing.assert_allclose([a["L"], a["Brier"], a["g_hat"]],
                                       [b["L"], b["Brier"], b["g_hat"]], rtol=1e-5)


@pytest.mark.slow  # a killed subprocess and its rerun: the slow tier
def test_sigkill_during_train_then_resume_continues_from_checkpoint(hf_students, tmp_path):
    d, _ = hf_students["llama_tied_gqa"]
    sel = write_selection(tmp_path / "train.jsonl", write_pool(tmp_path / "pool.jsonl", 8),
                          WEIGHTS)
    cfg = TrainConfig(epochs=3, lr=2e-3, batch_size=4, save_every=4, seed=5)
    flags = ["--epochs", 3, "--lr", 2e-3, "--batch-size", 4, "--save-every", 4, "--seed", 5,
             "-q"]
    run = tmp_path / "run"
    ckpts = run / "checkpoints"

    def checkpointed():
        return ckpts.is_dir() and any(p.name.isdigit() for p in ckpts.iterdir())

    proc = spawn(cli("train", "--data", sel, "--student", d, "--out", run, *flags), tmp_path)
    kill_when(proc, checkpointed)
    assert proc.returncode == -signal.SIGKILL
    assert not (run / "final").exists()
    latest = max(int(p.name) for p in ckpts.iterdir() if p.name.isdigit())
    flags.remove("-q")
    r = subprocess.run(cli("train", "--data", sel, "--student", d, "--out", run, *flags,
                           "--resume"), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert f"(resumed from step {latest})" in r.stdout and latest > 0, r.stdout

    full = train(d, sel, tmp_path / "ref", cfg, mesh=one_device())
    want = [json.loads(x) for x in (tmp_path / "ref/metrics.jsonl").read_text().splitlines()]
    got = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [g["step"] for g in got] == [w["step"] for w in want] == list(range(1, full.steps + 1))
    np.testing.assert_allclose([g["loss"] for g in got], [w["loss"] for w in want], rtol=1e-5)
    a = lark_jax.load_student(run / "final", mesh=one_device()).model
    b = lark_jax.load_student(tmp_path / "ref/final", mesh=one_device()).model
    np.testing.assert_allclose(np.asarray(a.layers.q_proj[...]), np.asarray(b.layers.q_proj[...]),
                               atol=1e-6)


@pytest.mark.slow  # a long oracle or end-to-end run: the slow tier
def test_resume_cuts_a_torn_metrics_line(hf_students, tmp_path):
    """A crash mid-write leaves half a metrics line; resume drops it and continues."""
    d, _ = hf_students["llama_tied_gqa"]
    sel = write_selection(tmp_path / "train.jsonl", write_pool(tmp_path / "pool.jsonl", 4),
                          WEIGHTS)
    cfg = TrainConfig(epochs=2, lr=1e-3, batch_size=4, save_every=3, seed=1)

    with pytest.raises(Preempted):
        train(d, sel, tmp_path / "run", cfg, mesh=one_device(), progress=preempt_at(4))
    with open(tmp_path / "run/metrics.jsonl", "a") as f:
        f.write('{"step": 5, "lo')
    s = train(d, sel, tmp_path / "run", cfg, mesh=one_device(), resume=True)
    steps = [json.loads(x)["step"] for x in (tmp_path / "run/metrics.jsonl").read_text()
             .splitlines()]
    assert s.resumed_from == 3 and steps == list(range(1, s.steps + 1))


# -- atomic files and links ---------------------------------------------------------------


def test_atomic_file_leaves_target_untouched_on_error(tmp_path):
    p = tmp_path / "out.json"
    p.write_text("old")
    with pytest.raises(RuntimeError), fsio.atomic_file(p) as f:
        f.write("half")
        raise RuntimeError("crash mid-write")
    assert p.read_text() == "old" and sorted(x.name for x in tmp_path.iterdir()) == ["out.json"]
    fsio.atomic_write(p, b"new")
    assert p.read_text() == "new"


def test_complete_lines_cuts_only_a_torn_tail(tmp_path):
    p = tmp_path / "log.jsonl"
    p.write_bytes(b'{"a": 1}\n{"a": 2}\n{"a": ')
    assert fsio.complete_lines(p) == b'{"a": 1}\n{"a": 2}\n'
    assert p.read_bytes() == b'{"a": 1}\n{"a": 2}\n'
    assert fsio.complete_lines(p) == p.read_bytes()


@pytest.fixture()
def outside(tmp_path):
    """A file outside the output directory that a planted link points at."""
    victim = tmp_path / "elsewhere" / "victim.txt"
    victim.parent.mkdir()
    victim.write_text("precious")
    return victim


def plant(link, target):
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(target)
    return link


def test_links_are_refused_by_the_low_level_writers(tmp_path, outside):
    dangling = plant(tmp_path / "d.txt", tmp_path / "elsewhere" / "new.txt")
    for f in (lambda p: fsio.atomic_write(p, "x"), fsio.open_append, fsio.complete_lines,
              fsio.make_dir):
        for link in (plant(tmp_path / f"l{id(f)}", outside), dangling):
            with pytest.raises(LarkError, match="symbolic link"):
                f(link)
    assert outside.read_text() == "precious" and not (tmp_path / "elsewhere/new.txt").exists()


def test_score_refuses_links_for_its_outputs(hf_students, tmp_path, outside):
    d, _ = hf_students["qwen2_bias_tied"]
    pool = write_pool(tmp_path / "pool.jsonl", n_problems=2)
    s = lark_jax.load_student(d, mesh=one_device())
    cfg = ScoreConfig(top_k=10, row_length=128)
    with pytest.raises(LarkError, match="symbolic link"):
        score_pool(s, pool, plant(tmp_path / "a.json", outside), cfg)
    plant(tmp_path / "b.json.partial.jsonl", outside)
    for resume in (False, True):
        with pytest.raises(LarkError, match="symbolic link"):
            score_pool(s, pool, tmp_path / "b.json", cfg, resume=resume)
    assert outside.read_text() == "precious" and not (tmp_path / "b.json").exists()


def test_select_refuses_links_and_writes_nothing(tmp_path, outside, capsys):
    pool = write_pool(tmp_path / "pool.jsonl", n_problems=3)
    s = lark_jax.load_student(make_tiny_student(tmp_path / "tiny", "llama"),
                              mesh=one_device())
    score_pool(s, pool, tmp_path / "scores.json", ScoreConfig(top_k=10, row_length=128))
    for link in ("sel.jsonl", "sel.jsonl.manifest.json"):
        plant(tmp_path / link, outside)
        rc = cli_main(["select", "--scores", str(tmp_path / "scores.json"), "--pool", str(pool),
                       "--out", str(tmp_path / "sel.jsonl"), "--budget", "1", "-q"])
        err = capsys.readouterr().err
        assert rc != 0 and "symbolic link" in err and "Traceback" not in err
        assert outside.read_text() == "precious"
        assert not (tmp_path / "sel.jsonl").is_file() or (tmp_path / "sel.jsonl").is_symlink()
        (tmp_path / link).unlink()


def test_train_refuses_links_in_the_run_directory(hf_students, tmp_path, outside):
    d, _ = hf_students["llama_tied_gqa"]
    sel = write_selection(tmp_path / "train.jsonl", write_pool(tmp_path / "pool.jsonl", 2),
                          WEIGHTS)
    cfg = TrainConfig(epochs=1, batch_size=6)
    with pytest.raises(LarkError, match="symbolic link"):
        train(d, sel, plant(tmp_path / "run_link", outside.parent), cfg, mesh=one_device())
    for name in ("metrics.jsonl", "run_config.json", "checkpoints"):
        run = tmp_path / f"run_{name}"
        plant(run / name, outside)
        with pytest.raises(LarkError, match="symbolic link"):
            train(d, sel, run, cfg, mesh=one_device())
    assert outside.read_text() == "precious"
    assert sorted(p.name for p in outside.parent.iterdir()) == ["victim.txt"]


def test_eval_refuses_links_in_its_directory(tmp_path, outside):
    from lark_jax.evaluation import EvalConfig, run_eval
    from lark_jax.evaluation.bench import load_benchmark

    bench_path = tmp_path / "b.jsonl"
    bench_path.write_text(json.dumps({"prompt": "1+1?", "answer": "2"}) + "\n")
    s = lark_jax.load_student(make_tiny_student(tmp_path / "tiny", "llama"),
                              mesh=one_device())
    for name in ("generations.jsonl", "run.json", "summary.json"):
        out = tmp_path / f"ev_{name}"
        plant(out / name, outside)
        with pytest.raises(LarkError, match="symbolic link"):
            run_eval(s, load_benchmark(bench_path), out, EvalConfig(max_new_tokens=2))
    with pytest.raises(LarkError, match="symbolic link"):
        run_eval(s, load_benchmark(bench_path), plant(tmp_path / "ev_dir", outside.parent),
                 EvalConfig(max_new_tokens=2))
    assert outside.read_text() == "precious"


# -- numerical safety ---------------------------------------------------------------------


def test_kernel_is_exact_on_huge_bfloat16_logits():
    """Logits of magnitude 1e4 in bfloat16: statistics in float32 match a float64 oracle."""
    rng = np.random.default_rng(0)
    v, k, n = 3000, 5, 16  # blocked top-K (24 blocks > 2k) and two-level sums (blocks of 500)
    z = rng.standard_normal((n, v)) * 4000
    z[4:8] = 5000 + rng.standard_normal((4, v))  # huge but close: top-K probabilities matter
    z = z.astype(jnp.bfloat16)
    z32 = np.asarray(z, np.float32)
    y = rng.integers(0, v, n)
    y[:4] = z32.argmax(-1)[:4]  # some targets are the arg-max
    y[4:8] = np.argsort(-z32[4:8], axis=1, kind="stable")[:, 2]  # inside the top K
    ce, brier_k, brier_f, _ = (np.asarray(x, np.float64) for x in
                               token_stats(jnp.asarray(z), jnp.asarray(y), k))
    z64 = z32.astype(np.float64)
    lse = z64.max(-1) + np.log(np.exp(z64 - z64.max(-1, keepdims=True)).sum(-1))
    want_ce = lse - z64[np.arange(n), y]
    p = np.exp(z64 - lse[:, None])
    onehot = np.eye(v)[y]
    top = np.argsort(-z64, axis=1, kind="stable")[:, :k]
    pk = np.exp(np.take_along_axis(z64, top, 1) - z64.max(-1, keepdims=True))
    pk /= pk.sum(-1, keepdims=True)
    p_true = np.where(top == y[:, None], pk, 0.0).sum(-1)
    assert np.isfinite([ce, brier_k, brier_f]).all()
    np.testing.assert_allclose(ce, want_ce, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(brier_f, ((onehot - p) ** 2).sum(-1), atol=1e-6)
    np.testing.assert_allclose(brier_k, 1 - 2 * p_true + (pk**2).sum(-1), atol=1e-6)
    assert (p_true[4:8] > 0).all()  # those targets are inside the top K


@pytest.mark.slow  # a long oracle or end-to-end run: the slow tier
def test_bf16_student_with_massive_activations_scores_and_trains_finitely(hf_students, tmp_path):
    d, _ = hf_students["llama3_rope_untied_bias"]
    s = lark_jax.load_student(d, mesh=one_device())
    embed = np.array(s.model.embed[...])
    embed[:, 0] = 3e4  # a "massive activation" channel, as in real LLMs
    s.model.embed[...] = jnp.asarray(embed)
    s.model.lm_head[...] = s.model.lm_head[...] * 300  # logits in the hundreds to thousands
    planted = lark_jax.save_student(s.model, tmp_path / "planted", s.tokenizer)
    pool = write_pool(tmp_path / "pool.jsonl", n_problems=3)
    got = {}
    for dt in ("float32", "bfloat16"):
        st = lark_jax.load_student(planted, dt, mesh=one_device())
        z = np.asarray(st.model(jnp.asarray([[5, 6, 7, 8]], jnp.int32)), np.float32)
        assert np.abs(z).max() > 300  # the planted model really is extreme
        score_pool(st, pool, tmp_path / f"{dt}.json", ScoreConfig(top_k=10, row_length=128))
        got[dt] = [c for v in json.loads((tmp_path / f"{dt}.json").read_text())["scores"]
                   .values() for c in v]
    for a, b in zip(got["bfloat16"], got["float32"], strict=True):
        assert np.isfinite([a["L"], a["Brier"], a["g_hat"]]).all()
        assert a["L"] == pytest.approx(b["L"], rel=0.02)
    sel = write_selection(tmp_path / "train.jsonl", pool, WEIGHTS)
    res = train(planted, sel, tmp_path / "run", TrainConfig(epochs=2, batch_size=3, lr=1e-4,
                                                             dtype="bfloat16"),
                mesh=one_device())
    recs = [json.loads(x) for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert len(recs) == res.steps == 6
    assert all(np.isfinite([r["loss"], r["grad_norm"]]).all() and r["loss"] > 1 for r in recs)


def test_pool_text_is_data_not_code(hf_students, tmp_path):
    """Shell and format metacharacters in a pool reach the tokenizer as plain text."""
    d, _ = hf_students["qwen2_bias_tied"]
    evil = "$(touch {0}) `touch {0}` {{0}} %s __import__('os').system('touch {0}')".format(
        tmp_path / "pwned")
    pool = tmp_path / "pool.jsonl"
    pool.write_text(json.dumps({"problem_id": 0, "candidate_id": 0, "teacher": "t; rm -rf /",
                                "messages": [{"role": "user", "content": evil},
                                             {"role": "assistant", "content": evil}]}) + "\n")
    s = lark_jax.load_student(d, mesh=one_device())
    score_pool(s, pool, tmp_path / "s.json", ScoreConfig(top_k=10, row_length=256))
    row = json.loads((tmp_path / "s.json").read_text())["scores"]["0"][0]
    assert row["teacher"] == "t; rm -rf /" and np.isfinite(row["L"])
    assert not (tmp_path / "pwned").exists()


def test_atomic_outputs_get_the_usual_permissions(tmp_path):
    fsio.atomic_write(tmp_path / "a.json", "{}")  # not mkstemp's private 0600
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o666 & ~fsio.UMASK


def test_resume_differences_name_every_field_once():
    from lark_jax.runs import differences

    old = {"a": 1, "b": "x", "gone": 3, "p": "/tmp/./d"}
    new = {"a": 2, "b": "x", "added": True, "p": "/tmp/d", "skip": 9}
    assert differences(old, new, may_change={"skip"}) == [
        "a: 1 != 2", "added: None != True", "gone: 3 != None", "p: '/tmp/./d' != '/tmp/d'"]
    assert differences(old, new, may_change={"skip", "gone"}, old_defaults={"added": True},
                       same={"p": lambda x, y: x.replace("/./", "/") == y},
                       name=lambda k: "--" + k) == ["--a: 1 != 2"]
