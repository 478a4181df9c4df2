"""Pools where they live: every source and layout reads (and scores) as the same
trajectories; filters and decontamination count what they drop; bad input is one line."""

import json
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import one_device, write_pool

import lark_jax
from lark_jax import LarkError
from lark_jax.data.filters import Decontaminator, FilterCounts, has_closed_boxed
from lark_jax.data.reader import PoolOptions, iter_pool, pool_size, read_pool
from lark_jax.learnability.runner import ScoreConfig, score_pool


def base_records(tmp_path):
    """The fixture's trajectories as (problem_id, candidate_id, teacher, problem, answer),
    user + assistant turns only (what every layout can express)."""
    src = write_pool(tmp_path / "src.jsonl", n_problems=4)
    out = []
    for ln in open(src):
        r = json.loads(ln)
        user = next(m["content"] for m in r["messages"] if m["role"] == "user")
        answer = next(m["content"] for m in r["messages"] if m["role"] == "assistant")
        out.append((r["problem_id"], r["candidate_id"], r["teacher"], user, answer))
    return out


def messages(problem, answer):
    return [{"role": "user", "content": problem}, {"role": "assistant", "content": answer}]


def problem_rows(recs) -> dict:
    """The trajectories as columns of the one-problem-a-row layout."""
    problems = {}
    for p, c, t, q, a in recs:
        problems.setdefault(p, (q, []))[1].append((c, t, a))
    return {"problem_id": list(problems), "problem": [q for q, _ in problems.values()],
            "generations": [[a for _, _, a in g] for _, g in problems.values()],
            "teachers": [[t for _, t, _ in g] for _, g in problems.values()]}


def write_layouts(tmp_path, recs) -> dict:
    """The same trajectories in every layout and source lark-jax reads."""
    import datasets

    d = tmp_path / "layouts"
    d.mkdir()
    out = {}
    ref = d / "pool.jsonl"
    ref.write_text("".join(json.dumps({"problem_id": p, "candidate_id": c, "teacher": t,
                                       "messages": messages(q, a)}) + "\n"
                           for p, c, t, q, a in recs))
    out["reference jsonl"] = ref
    traj = pa.table({"problem_id": [r[0] for r in recs], "candidate_id": [r[1] for r in recs],
                     "model": [r[2] for r in recs],
                     "messages": [messages(r[3], r[4]) for r in recs]})
    pq.write_table(traj, d / "traj.parquet")
    out["trajectory parquet (model column)"] = d / "traj.parquet"
    sharegpt = d / "sharegpt.jsonl"
    sharegpt.write_text("".join(json.dumps({
        "id": p, "teacher": t, "conversations": [{"from": "human", "value": q},
                                                 {"from": "gpt", "value": a}]}) + "\n"
        for p, c, t, q, a in recs))  # no candidate_id: the order within the problem
    out["sharegpt jsonl"] = sharegpt
    rows = problem_rows(recs)
    pq.write_table(pa.table(rows), d / "problems.parquet", row_group_size=2)
    out["problem parquet"] = d / "problems.parquet"
    shards = d / "shards"
    shards.mkdir()
    n = len(rows["problem_id"])
    for i, part in enumerate((slice(0, n // 2), slice(n // 2, n))):
        pq.write_table(pa.table({k: v[part] for k, v in rows.items()}),
                       shards / f"train-{i:05d}-of-00002.parquet")
    out["parquet shard directory"] = shards
    datasets.Dataset.from_dict(rows).save_to_disk(str(d / "saved"))
    out["save_to_disk"] = d / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows),
                          "test": datasets.Dataset.from_dict({k: v[:1] for k, v in
                                                              rows.items()})}
                         ).save_to_disk(str(d / "saved_dict"))
    out["save_to_disk DatasetDict"] = d / "saved_dict"
    return out


def hub_cache(tmp_path, rows: dict, repo="org/pool", rev="b" * 40):
    """A Hugging Face hub cache holding one dataset repo snapshot (as `hf download` leaves
    it), for HF_HUB_CACHE."""
    root = tmp_path / "hub"
    repo_dir = root / f"datasets--{repo.replace('/', '--')}"
    snap = repo_dir / "snapshots" / rev / "data"
    snap.mkdir(parents=True)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(rev)
    pq.write_table(pa.table(rows), snap / "train-00000-of-00001.parquet")
    pq.write_table(pa.table({k: v[:1] for k, v in rows.items()}),
                   snap / "test-00000-of-00001.parquet")
    return root


@pytest.fixture
def layouts(tmp_path, monkeypatch):
    recs = base_records(tmp_path)
    out = write_layouts(tmp_path, recs)
    monkeypatch.setenv("HF_HUB_CACHE", str(hub_cache(tmp_path, problem_rows(recs))))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out["hub dataset id"] = "hf://datasets/org/pool"
    return recs, out


def test_every_layout_reads_as_the_same_trajectories(layouts):
    recs, sources = layouts
    want = [(p, c, t, tuple(messages(q, a))) for p, c, t, q, a in recs]
    for name, src in sources.items():
        got = sorted((r.problem_id, r.candidate_id, r.teacher, tuple(r.messages))
                     for r in iter_pool(src))
        assert got == sorted(want), name
        assert pool_size(src) == len(want), name


def test_every_layout_scores_identically(layouts, hf_students, tmp_path):
    """One real (transformers-built) student scores each layout: the same L, rho, g_hat,
    problem ids, candidate ids and teachers, with no format flag."""
    _, sources = layouts
    d, _ = hf_students["qwen2_bias_tied"]
    student = lark_jax.load_student(d, mesh=one_device(), tokenizer=True)
    results = {}
    for i, (name, src) in enumerate(sources.items()):
        out = tmp_path / f"scores{i}.json"
        score_pool(student, src, out, ScoreConfig(row_length=256, batch_tokens=1024))
        obj = json.loads(out.read_text())
        results[name] = {(int(pid), r["candidate_id"]): (r["teacher"], r["L"], r["rho"],
                                                          r["g_hat"])
                         for pid, rows in obj["scores"].items() for r in rows}
    ref = results.pop("reference jsonl")
    assert len(ref) == 12
    for name, got in results.items():
        assert got.keys() == ref.keys(), name
        for key, (teacher, *nums) in ref.items():
            assert got[key][0] == teacher, name
            np.testing.assert_allclose(got[key][1:], nums, rtol=1e-6, err_msg=name)


def test_string_ids_are_numbered_and_kept(tmp_path):
    rows = {"uuid": ["u-b", "u-a"], "question": ["1+1?", "2+2?"],
            "completions": [["2 \\boxed{2}", "two"], ["4"]]}
    pq.write_table(pa.table(rows), tmp_path / "p.parquet")
    got = read_pool(tmp_path / "p.parquet")
    assert [(r.problem_id, r.candidate_id, r.source_id, r.teacher) for r in got] == [
        (0, 0, "u-b", "p"), (0, 1, "u-b", "p"), (1, 0, "u-a", "p")]
    assert got[0].where.endswith("p.parquet:row 0") and got[2].where.endswith(":row 1")


def test_columns_flag_maps_other_names(tmp_path):
    rows = {"qid": [7], "text": ["3+4?"], "outs": [["7", "seven"]], "by": ["t1"]}
    pq.write_table(pa.table(rows), tmp_path / "p.parquet")
    with pytest.raises(LarkError, match="cannot tell the pool's layout from its columns "
                                        r"\(qid, text, outs, by\).*--columns"):
        read_pool(tmp_path / "p.parquet")
    cols = {"problem_id": "qid", "problem": "text", "generations": "outs", "teacher": "by"}
    got = read_pool(tmp_path / "p.parquet", PoolOptions(columns=cols))
    assert [(r.problem_id, r.candidate_id, r.teacher) for r in got] == [(7, 0, "t1"),
                                                                         (7, 1, "t1")]


def test_ambiguous_layout_names_the_flag(tmp_path):
    pq.write_table(pa.table({"messages": [messages("q", "a")], "problem": ["q"],
                             "generations": [["a"]]}), tmp_path / "p.parquet")
    with pytest.raises(LarkError, match="fit both .* pass --layout trajectory or --layout"):
        read_pool(tmp_path / "p.parquet")
    assert len(read_pool(tmp_path / "p.parquet", PoolOptions(layout="problem"))) == 1


def test_filters_and_decontamination_count_what_they_drop(tmp_path):
    """OpenR1-style rows with known answers: 3 problems x 3 generations."""
    rows = {
        "problem": ["What is 2 plus 2?",
                    "Find the sum of all positive integers n such that n squared plus one "
                    "divides n cubed plus five, and give the answer modulo one thousand.",
                    "Compute 6 times 7."],
        "generations": [["4 \\boxed{4}", "\\boxed{4", "four"],
                        ["x \\boxed{12}", "y \\boxed{13}", "z \\boxed{12}"],
                        ["\\boxed{42}", "42", "\\boxed{{4}2}"]],
        "correctness_math_verify": [[True, False, False], [True, False, True],
                                    [True, True, None]],
        "finish_reasons": [["stop", "length", "stop"], ["stop", "stop", "stop"],
                           ["stop", "stop", "length"]],
    }
    pq.write_table(pa.table(rows), tmp_path / "openr1.parquet")
    bench = ["WHAT is 2 plus 2 ?",  # normalised exact match: problem 0
             "Intro words here: find the sum of all positive integers n such that n squared "
             "plus one divides something else entirely."]  # a shared 13-gram: problem 1
    counts = FilterCounts()
    kept = list(iter_pool(tmp_path / "openr1.parquet",
                          PoolOptions(require=("correctness_math_verify",), complete=True,
                                      exclude=Decontaminator(bench)), counts=counts))
    # verified: (0,0) (1,0) (1,2) (2,0) (2,1); complete by finish reason: all of those;
    # contaminated: problems 0 and 1, so only problem 2 remains.
    assert [(r.problem_id, r.candidate_id) for r in kept] == [(2, 0), (2, 1)]
    assert counts.required == {"correctness_math_verify": 4}
    assert counts.incomplete == 0
    assert (counts.contaminated_problems, counts.contaminated_trajectories) == (2, 3)
    # Without a finish-reason column, completeness is a closed \boxed{}.
    del rows["finish_reasons"]
    pq.write_table(pa.table(rows), tmp_path / "nofinish.parquet")
    counts = FilterCounts()
    kept = list(iter_pool(tmp_path / "nofinish.parquet", PoolOptions(complete=True),
                          counts=counts))
    assert counts.incomplete == 3  # "\boxed{4", "four", "42"
    assert len(kept) == 6
    assert has_closed_boxed("a \\boxed{\\frac{1}{2}} b") and not has_closed_boxed("\\boxed{x")


def test_filters_counts_reach_the_scores_and_the_manifest(hf_students, tmp_path):
    d, _ = hf_students["qwen2_bias_tied"]
    rows = {"problem": ["What is 2 plus 2?", "Compute 6 times 7."],
            "generations": [["4 \\boxed{4}", "four"], ["\\boxed{42}", "42 \\boxed{42}"]],
            "ok": [[True, False], [True, True]]}
    pq.write_table(pa.table(rows), tmp_path / "p.parquet")
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps([{"problem": "what is 2 plus 2", "answer": "4"}]))
    out = tmp_path / "scores.json"
    run = [sys.executable, "-m", "lark_jax"]
    r = subprocess.run([*run, "score", "-q", "--pool", str(tmp_path / "p.parquet"), "--student",
                        str(d), "--out", str(out), "--require", "ok",
                        "--exclude-benchmark", str(bench), "--row-length", "256",
                        "--batch-tokens", "1024"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    obj = json.loads(out.read_text())
    assert obj["n_scored"] == 2 and list(obj["scores"]) == ["1"]
    dropped = obj["pool_filters"]["dropped"]
    assert dropped["required"] == {"ok": 1} and dropped["contaminated_trajectories"] == 1
    sel = tmp_path / "sel.parquet.jsonl"
    r = subprocess.run([*run, "select", "-q", "--scores", str(out), "--pool",
                        str(tmp_path / "p.parquet"), "--out", str(sel)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    manifest = json.loads((tmp_path / "sel.parquet.jsonl.manifest.json").read_text())
    assert manifest["pool_filters"]["dropped"]["contaminated_problems"] == 1
    assert [json.loads(x)["meta"]["problem_id"] for x in open(sel)] == [1]


def _bad(tmp_path, name):
    if name == "missing column":
        pq.write_table(pa.table({"problem": ["q", "r"], "generations": [["a"], ["b"]]}),
                       tmp_path / "p.parquet")
        return PoolOptions(require=("verified",)), r"p.parquet:row 0: missing column 'verified'"
    if name == "list lengths":
        pq.write_table(pa.table({"problem": ["q", "r"], "generations": [["a"], ["b", "c"]],
                                 "teachers": [["t"], ["t"]]}), tmp_path / "p.parquet")
        return None, (r"p.parquet:row 1: list columns of different lengths: 'generations' has "
                      r"2 items, 'teachers' has 1")
    if name == "non-string generation":
        (tmp_path / "p.jsonl").write_text(json.dumps({"problem": "q", "generations": ["a"]})
                                          + "\n" + json.dumps({"problem": "r",
                                                               "generations": ["b", 3]}) + "\n")
        return None, r"p.jsonl:2: generations\[1\] must be a string, got int"
    if name == "empty pool":
        pq.write_table(pa.table({"problem": pa.array([], pa.string()),
                                 "generations": pa.array([], pa.list_(pa.string()))}),
                       tmp_path / "p.parquet")
        return None, r"p.parquet: pool is empty"
    if name == "shard schemas":
        (tmp_path / "shards").mkdir()
        pq.write_table(pa.table({"problem": ["q"], "generations": [["a"]]}),
                       tmp_path / "shards" / "a.parquet")
        pq.write_table(pa.table({"problem": ["q"], "generations": [[1]]}),
                       tmp_path / "shards" / "b.parquet")
        return None, (r"shards/b.parquet: shards have different schemas: column 'generations' "
                      r"is list<element: string> in a.parquet but list<element: int64> here")
    raise AssertionError(name)


BAD = ["missing column", "list lengths", "non-string generation", "empty pool",
       "shard schemas"]


@pytest.mark.parametrize("name", BAD)
def test_bad_pools_are_one_line_naming_file_row_and_column(tmp_path, name):
    options, match = _bad(tmp_path, name)
    src = next(p for p in (tmp_path / "p.parquet", tmp_path / "p.jsonl", tmp_path / "shards")
               if p.exists())
    with pytest.raises(LarkError, match=match):
        read_pool(src, options)


@pytest.mark.parametrize("name", ["list lengths", "shard schemas"])
def test_bad_pools_from_the_cli_write_nothing(tmp_path, hf_students, name):
    _bad(tmp_path, name)
    src = next(p for p in (tmp_path / "p.parquet", tmp_path / "shards") if p.exists())
    d, _ = hf_students["qwen2_bias_tied"]
    out = tmp_path / "scores.json"
    r = subprocess.run([sys.executable, "-m", "lark_jax", "score", "-q", "--pool", str(src),
                        "--student", str(d), "--out", str(out)], capture_output=True, text=True)
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert not out.exists() and not list(tmp_path.glob("scores.json*"))


def test_hub_dataset_not_in_the_cache_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(LarkError, match="hf://datasets/org/absent: this Hub dataset is not in "
                                        "the local Hugging Face cache"):
        read_pool("hf://datasets/org/absent")
    with pytest.raises(LarkError, match="ORG/NAME"):
        read_pool("hf://datasets/justone")


def model_hub_cache(tmp_path, model_dir, repo="org/tiny-student", rev="c" * 40):
    """A Hugging Face hub cache holding one model snapshot (as `hf download` leaves it)."""
    import shutil

    repo_dir = tmp_path / "hub" / f"models--{repo.replace('/', '--')}"
    shutil.copytree(model_dir, repo_dir / "snapshots" / rev)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(rev)
    return tmp_path / "hub"


def test_student_named_by_hub_id_scores_as_its_directory(hf_students, tmp_path, monkeypatch):
    d, _ = hf_students["llama_tied_gqa"]
    monkeypatch.setenv("HF_HUB_CACHE", str(model_hub_cache(tmp_path, d)))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pool = write_pool(tmp_path / "pool.jsonl", n_problems=3)
    cfg = ScoreConfig(row_length=256, batch_tokens=1024)
    outs = {}
    for name in (str(d), "org/tiny-student", f"org/tiny-student@{'c' * 40}"):
        student = lark_jax.load_student(name, mesh=one_device())
        out = tmp_path / f"s{len(outs)}.json"
        score_pool(student, pool, out, cfg)
        outs[name] = json.loads(out.read_text())
    ref = outs.pop(str(d))
    for name, got in outs.items():
        assert got["student_model"] == name
        assert got["scores"] == ref["scores"], name
    with pytest.raises(LarkError, match="org/absent: this Hub model is not in the local "
                                        "Hugging Face cache"):
        lark_jax.load_student("org/absent", mesh=one_device())
    with pytest.raises(LarkError, match="model directory not found"):
        lark_jax.load_student(tmp_path / "no" / "such" / "dir", mesh=one_device())
    r = subprocess.run([sys.executable, "-m", "lark_jax", "score", "-q", "--pool", str(pool),
                        "--student", "org/absent", "--out", str(tmp_path / "x.json")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "not in the local Hugging Face cache" in r.stderr


def test_parquet_selection_trains_as_its_jsonl(hf_students, tmp_path):
    """select writes parquet by the output's suffix (messages + provenance columns), and
    train on it computes exactly what it computes on the JSONL selection."""
    from lark_jax.training.trainer import TrainConfig, train

    d, _ = hf_students["llama_tied_gqa"]
    pool = write_pool(tmp_path / "pool.jsonl", n_problems=4)
    scores = tmp_path / "scores.json"
    score_pool(lark_jax.load_student(d, mesh=one_device()), pool, scores,
               ScoreConfig(row_length=256, batch_tokens=1024))
    outs = {}
    for suffix in ("jsonl", "parquet"):
        out = tmp_path / f"train.{suffix}"
        r = subprocess.run([sys.executable, "-m", "lark_jax", "select", "-q", "--scores",
                            str(scores), "--pool", str(pool), "--out", str(out),
                            "--budget", "2"], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        outs[suffix] = out
    jsonl = [json.loads(x) for x in open(outs["jsonl"])]
    table = pq.read_table(outs["parquet"]).to_pylist()
    assert len(table) == len(jsonl) == 8
    for row, rec in zip(table, jsonl, strict=True):
        assert row["messages"] == rec["messages"]
        for k in ("problem_id", "candidate_id", "teacher", "train_weight", "score"):
            assert row[k] == rec["meta"][k], k
    cfg = TrainConfig(max_steps=2, epochs=1, batch_size=4, lr=1e-3, micro_batch_tokens=1024,
                      max_length=512)
    losses = {}
    for suffix, data in outs.items():
        train(d, data, tmp_path / f"run-{suffix}", cfg, mesh=one_device())
        losses[suffix] = [json.loads(x)["loss"] for x in open(tmp_path / f"run-{suffix}" /
                                                            "metrics.jsonl")]
    assert losses["parquet"] == losses["jsonl"] and len(losses["jsonl"]) == 2
