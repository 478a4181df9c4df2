"""select over scores and pool in passes (selection.stream): the same bytes as the
in-memory path, from JSON and parquet scores, into JSONL and parquet; the incremental
JSON reader against json.load; score --out scores.parquet against the scores JSON."""

from __future__ import annotations

import argparse
import json
import math
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import one_device, write_pool

import lark_jax
from lark_jax.errors import LarkError
from lark_jax.learnability.runner import ScoreConfig, score_pool
from lark_jax.progress import Reporter
from lark_jax.selection import load_scores, scores_stream, stream
from lark_jax.selection.command import add_arguments, run
from lark_jax.selection.io import manifest_path
from lark_jax.selection.scores_stream import HEADER_KEY, read_json_scores


def _doc(rng):
    scores = {str(rng.randint(0, 10 ** 9)): [
        {"candidate_id": c, "teacher": 'té"x',
         "g_hat": rng.choice([rng.random() * 1e5, math.nan, 1e-300, -3, math.inf])}
        for c in range(rng.randint(0, 3))] for _ in range(rng.randint(0, 5))}
    return {"method": "lark_ghat", "n": 12345678901, "scores": scores, "after": [1.5, None]}


def test_json_reader_reads_what_json_load_reads(tmp_path, monkeypatch):
    """Windows of 7 characters put a boundary inside every kind of token."""
    monkeypatch.setattr(scores_stream, "CHUNK_CHARS", 7)
    rng = random.Random(0)
    path = tmp_path / "s.json"
    for _ in range(150):
        doc = _doc(rng)
        path.write_text(json.dumps(doc, indent=rng.choice([None, 1, 2])))
        header = {}
        got = {k: v for k, v, _ in read_json_scores(path, header)}
        assert json.dumps(got) == json.dumps(doc["scores"])  # NaN/inf spelled alike
        assert header == {k: v for k, v in doc.items() if k != "scores"}


@pytest.mark.parametrize("text", [
    '{"scores": {"0": [{"candidate_id": 0, "g_hat": 0.1},]}}',
    '{"scores": {"0": [1,2]}\n , }',
    '{"a": 1\n\n "scores": {}}',
    '{"scores": {"0": [1,2]}} x',
    '',
    '{"scores": {"1": [tru]}}',
])
def test_json_reader_errors_at_json_loads_position(tmp_path, monkeypatch, text):
    monkeypatch.setattr(scores_stream, "CHUNK_CHARS", 5)
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(json.JSONDecodeError) as ref:
        json.loads(text)
    with pytest.raises(LarkError, match=rf"bad\.json: malformed JSON \(.* at line "
                                        rf"{ref.value.lineno} column {ref.value.colno}\)"):
        list(read_json_scores(path, {}))


def write_case(tmp_path, n_problems=300, layout="pool_line", seed=0):
    """A pool of n_problems (1-6 candidates, shuffled lines) and scores for it. layout:
    pool_line (lark-jax's scores), "scores file order" (rows listed in pool order, the
    reference's) or "shuffled" (neither: select takes the order from the pool file)."""
    rng = random.Random(seed)
    recs = []
    for pid in rng.sample(range(10 ** 6), n_problems):
        for cid in rng.sample(range(10), rng.randint(1, 6)):
            recs.append((pid, cid))
    rng.shuffle(recs)
    pool = tmp_path / "pool.jsonl"
    with open(pool, "w") as f:
        for pid, cid in recs:
            f.write(json.dumps({"problem_id": pid, "candidate_id": cid,
                                "teacher": f"t{cid % 3}",
                                "messages": [{"role": "user", "content": f"q{pid}"},
                                             {"role": "assistant",
                                              "content": f"a{pid}.{cid} é"}]}) + "\n")
    scores: dict = {}
    levels = [0.1, 0.2, 0.3]  # few values: many ties, decided by the tie order
    for line, (pid, cid) in enumerate(recs, 1):
        row = {"candidate_id": cid, "teacher": f"t{cid % 3}",
               "g_hat": rng.choice(levels + [math.nan] * (rng.random() < 0.05)),
               "L": rng.uniform(0.1, 2), "rsr": rng.random(), "tokens": rng.randint(5, 50)}
        if layout == "pool_line":
            row["pool_line"] = line
        scores.setdefault(str(pid), []).append(row)
    if layout == "shuffled":
        for rows in scores.values():
            rng.shuffle(rows)
    items = list(scores.items())
    rng.shuffle(items)
    items.append((str(10 ** 7), []))  # a problem with no candidates
    path = tmp_path / "scores.json"
    path.write_text(json.dumps({"method": "lark_ghat", "scores": dict(items)}))
    return pool, path


def to_parquet_scores(scores, path):
    obj = json.loads(scores.read_text())
    rows = [{"problem_id": int(pid), **r} for pid, rs in obj["scores"].items() for r in rs]
    random.Random(1).shuffle(rows)  # problems split across batches, in any order
    table = pa.Table.from_pylist(rows)
    header = {k: v for k, v in obj.items() if k != "scores"}
    pq.write_table(table.replace_schema_metadata({HEADER_KEY: json.dumps(header)}), path,
                   row_group_size=97)
    return path


def select_files(tmp_path, pool, scores, out_name, *extra):
    p = argparse.ArgumentParser()
    add_arguments(p)
    out = tmp_path / "out" / out_name
    run(p.parse_args(["--scores", str(scores), "--pool", str(pool), "--out", str(out),
                      *extra]), Reporter(quiet=True))
    manifest = json.loads(manifest_path(out).read_text())
    manifest.pop("created")
    return out.read_bytes(), manifest


@pytest.mark.parametrize("layout", ["pool_line", "scores file order", "shuffled"])
@pytest.mark.parametrize("part_bytes", [None, 1500])
def test_streaming_writes_the_in_memory_bytes(tmp_path, layout, part_bytes, monkeypatch):
    """part_bytes=1500: the scores spread over all 64 partitions (default: one, a small file)."""
    if part_bytes:
        monkeypatch.setattr(stream, "PART_BYTES", part_bytes)
    pool, scores = write_case(tmp_path, layout=layout)
    cases = [("--budget", "2"), ("--budget", "1", "--solver", "exact"),
             ("--solver", "mirror-descent", "--tau", "0.05"), ("--policy", "random"),
             ("--policy", "min-loss", "--budget", "3"), ("--policy", "shortest"),
             ("--policy", "all")]
    for extra in cases:
        for name in ("train.jsonl", "train.parquet"):
            a, ma = select_files(tmp_path, pool, scores, name, *extra)
            b, mb = select_files(tmp_path, pool, scores, name, *extra, "--in-memory")
            assert a == b, (extra, name)
            assert ma == mb, (extra, name)
            if extra == cases[0]:
                assert ma["n_problems"] == 300 and ma["n_problems_empty"] == 1
                assert (("pool file (re-read)" in ma["tie_order"]) == (layout == "shuffled"))
    # nothing left behind but the outputs
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "train.jsonl", "train.jsonl.manifest.json", "train.parquet",
        "train.parquet.manifest.json"]


def test_parquet_scores_select_as_their_json(tmp_path):
    pool, scores = write_case(tmp_path, layout="scores file order")
    pscores = to_parquet_scores(scores, tmp_path / "scores.parquet")
    # split across row groups in shuffled order, there is no listing order to take ties
    # from: both must fall back to the pool file's order, as the JSON does by line
    for extra in (("--budget", "2"), ("--policy", "rsr")):
        a, ma = select_files(tmp_path, pool, scores, "a.jsonl", *extra)
        for mem in ((), ("--in-memory",)):
            b, mb = select_files(tmp_path, pool, pscores, "a.jsonl", *extra, *mem)
            assert a == b, (extra, mem)
    t_json, t_pq = load_scores(scores, need=("g_hat",)), load_scores(pscores, need=("g_hat",))
    assert t_json.problem_ids.tolist() == t_pq.problem_ids.tolist()
    np.testing.assert_array_equal(t_json.fields["g_hat"], t_pq.fields["g_hat"])


def test_streaming_errors_match_the_in_memory_path(tmp_path):
    pool, scores = write_case(tmp_path, n_problems=40)
    obj = json.loads(scores.read_text())
    pid = next(k for k, v in obj["scores"].items() if v)
    obj["scores"][pid].append({"candidate_id": 99, "g_hat": 0.5})
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(obj))
    for mem in ((), ("--in-memory",)):
        with pytest.raises(LarkError, match=rf"bad\.json: 1 scored candidate.*problem {pid}, "
                                            r"candidate 99"):
            select_files(tmp_path, pool, bad, "x.jsonl", *mem)
    # a problem listed twice (two keys naming one id)
    text = scores.read_text().replace('"scores": {', f'"scores": {{"0{pid}": [], ', 1)
    bad.write_text(text.replace(f'"0{pid}": []', f'"0{pid}": [{{"candidate_id": 99, '
                                                 f'"g_hat": 0.5}}]'))
    for mem in ((), ("--in-memory",)):
        with pytest.raises(LarkError, match=rf"problem {pid}\).*problem listed twice|"
                                            rf"problem listed twice"):
            select_files(tmp_path, pool, bad, "x.jsonl", *mem)
    # a key twice in the pool: iter_pool's own message, with the line
    lines = pool.read_text().splitlines()
    (tmp_path / "dup.jsonl").write_text("\n".join(lines + [lines[3]]) + "\n")
    with pytest.raises(LarkError, match=rf"dup\.jsonl:{len(lines) + 1}: duplicate"):
        select_files(tmp_path, tmp_path / "dup.jsonl", scores, "x.jsonl")
    assert not (tmp_path / "out" / "x.jsonl").exists()
    assert not list((tmp_path / "out").glob(".lark-select-*"))  # the spill is gone


def test_score_parquet_is_the_scores_json(hf_students, tmp_path):
    """score --out scores.parquet: one row per candidate with the JSON's every field and the
    same g_hat bit for bit, header in the metadata; select reads it as the JSON."""
    d, _ = hf_students["qwen2_bias_tied"]
    pool = write_pool(tmp_path / "pool.jsonl", n_problems=5)
    student = lark_jax.load_student(d, mesh=one_device(), tokenizer=True)
    cfg = ScoreConfig(row_length=256, batch_tokens=1024)
    score_pool(student, pool, tmp_path / "s.json", cfg)
    summary = score_pool(student, pool, tmp_path / "s.parquet", cfg)
    obj = json.loads((tmp_path / "s.json").read_text())
    want = {(int(p), r["candidate_id"]): r for p, rs in obj["scores"].items() for r in rs}
    pf = pq.ParquetFile(tmp_path / "s.parquet")
    header = json.loads(pf.schema_arrow.metadata[HEADER_KEY])
    assert header == {k: v for k, v in obj.items() if k != "scores"}
    rows = pf.read().to_pylist()
    assert len(rows) == len(want) == 15 and summary.n_scored == 15
    for r in rows:
        w = want[(r.pop("problem_id"), r["candidate_id"])]
        assert r.pop("source_id") is None
        assert r == w
    for extra in ((), ("--policy", "max-loss")):
        a, _ = select_files(tmp_path, pool, tmp_path / "s.json", "a.jsonl", *extra)
        b, _ = select_files(tmp_path, pool, tmp_path / "s.parquet", "a.jsonl", *extra)
        assert a == b
    assert not list(tmp_path.glob("s.parquet.partial*"))


def test_seen_keys_finds_every_repeat_as_a_set_would():
    """The pool reader's compact duplicate check (data.reader.SeenKeys): a repeat is reported
    (at the latest when its batch is merged, or at finish), never a key seen once."""
    from lark_jax.data.reader import SeenKeys

    rng = random.Random(0)
    for _ in range(300):
        keys = [(rng.randint(-5, 40) * (1 if rng.random() < 0.9 else 2 ** 54),
                 rng.randint(0, 3)) for _ in range(60)]
        first = next((i for i, k in enumerate(keys) if k in keys[:i]), None)
        seen = SeenKeys(flush_at=rng.randint(1, 9))
        got = None
        try:
            for i, k in enumerate(keys):
                seen.add(k, str(i))
            seen.finish()
        except LarkError as e:
            got = int(e.where)
        assert (got is None) == (first is None)
        if first is not None:  # a real repeat, not before the first one
            assert got >= first and keys[got] in keys[:got]
        else:
            assert seen.sorted.tolist() == sorted(seen.sorted.tolist())


def test_pool_verdicts_reach_the_scores_and_verified_selects_them(hf_students, tmp_path):
    """An OpenR1-style pool's correctness_math_verify (parallel to the generations, with an
    empty cell) becomes each score row's "correct" (1, 0, NaN), in the JSON and the parquet;
    select --policy verified keeps only trajectories verified correct."""
    d, _ = hf_students["qwen2_bias_tied"]
    verdicts = [[True, False, None], [False, False], [None, True, True]]
    rows = {"problem_id": [10, 11, 12], "problem": ["1+1?", "2+3?", "4+4?"],
            "generations": [["2 \\boxed{2}", "3", "two"], ["6", "4"], ["8", "\\boxed{8}", "8!"]],
            "correctness_math_verify": verdicts}
    pool = tmp_path / "pool.parquet"
    pq.write_table(pa.table(rows), pool)
    student = lark_jax.load_student(d, mesh=one_device(), tokenizer=True)
    cfg = ScoreConfig(row_length=256, batch_tokens=1024)
    want = {(10 + i, k): (math.nan if v is None else float(v))
            for i, vs in enumerate(verdicts) for k, v in enumerate(vs)}
    for name in ("s.json", "s.parquet"):
        score_pool(student, pool, tmp_path / name, cfg)
        t = load_scores(tmp_path / name, need=("correct",))
        got = {(int(p), int(c)): float(v) for i, p in enumerate(t.problem_ids)
               for c, v, m in zip(t.candidate_ids[i], t.fields["correct"][i], t.mask[i],
                                  strict=True) if m}
        assert got.keys() == want.keys()
        for key, v in want.items():
            assert (math.isnan(v) and math.isnan(got[key])) or got[key] == v, key
        for mem in ((), ("--in-memory",)):
            out, _ = select_files(tmp_path, pool, tmp_path / name, "v.jsonl", "--policy",
                                  "verified", "--budget", "2", *mem)
            picked = {(json.loads(x)["meta"]["problem_id"], json.loads(x)["meta"]["candidate_id"])
                      for x in out.decode().splitlines()}
            assert picked == {k for k, v in want.items() if v == 1.0}


def test_bad_verdicts_are_one_error_from_either_path(tmp_path):
    pool, scores = write_case(tmp_path, n_problems=20)
    obj = json.loads(scores.read_text())
    for rows in obj["scores"].values():
        for r in rows:
            r["correct"] = 0.5  # not a verdict
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(obj))
    for mem in ((), ("--in-memory",)):
        with pytest.raises(LarkError, match=r"bad\.json: .*correct"):
            select_files(tmp_path, pool, bad, "v.jsonl", "--policy", "verified", *mem)
    assert not (tmp_path / "out").exists()


def test_score_parquet_resumes_to_the_uninterrupted_file(hf_students, tmp_path):
    """A parquet scoring run stopped after its first batch keeps its sidecar; --resume
    skips the rows there (known by key, the rows themselves are not held) and the result
    equals an uninterrupted run's."""
    d, _ = hf_students["qwen2_bias_tied"]
    pool = write_pool(tmp_path / "pool.jsonl", n_problems=6)
    student = lark_jax.load_student(d, mesh=one_device(), tokenizer=True)
    cfg = ScoreConfig(row_length=128, batch_tokens=256, window_tokens=256)
    score_pool(student, pool, tmp_path / "whole.parquet", cfg)

    class Stop(Exception):
        pass

    def stop(n, tokens):
        raise Stop

    with pytest.raises(Stop):
        score_pool(student, pool, tmp_path / "part.parquet", cfg, progress=stop)
    sidecar = tmp_path / "part.parquet.partial.jsonl"
    done = len(sidecar.read_text().splitlines()) - 1
    assert 0 < done < 18 and not (tmp_path / "part.parquet").exists()
    summary = score_pool(student, pool, tmp_path / "part.parquet", cfg, resume=True)
    assert summary.n_resumed == done and summary.n_scored == 18
    key = lambda r: (r["problem_id"], r["candidate_id"])  # noqa: E731
    whole = sorted(pq.read_table(tmp_path / "whole.parquet").to_pylist(), key=key)
    part = sorted(pq.read_table(tmp_path / "part.parquet").to_pylist(), key=key)
    assert not sidecar.exists() and len(part) == len(whole) == 18
    for a, b in zip(part, whole, strict=True):  # batches differ: floats to rounding
        assert a.keys() == b.keys()
        for k in a:
            if isinstance(a[k], float):
                assert a[k] == pytest.approx(b[k], rel=1e-6), k
            else:
                assert a[k] == b[k], k
