"""Pool validation: the bad-input matrix (library and CLI) and a hypothesis fuzz of the parser."""

import json
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lark_jax import LarkError
from lark_jax.data.pool import validate_record
from lark_jax.data.reader import read_pool

GOOD = {"problem_id": 1, "candidate_id": 0, "teacher": "t",
        "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}


def line(**over):
    rec = dict(GOOD)
    rec.update(over)
    return json.dumps(rec)


BAD = [
    ("malformed_json", '{"problem_id": 1,', "malformed JSON"),
    ("not_object", "[1, 2]", "expected a JSON object"),
    ("missing_field", json.dumps({k: v for k, v in GOOD.items() if k != "messages"}),
     "missing field 'messages'"),
    ("mistyped_id", line(problem_id="7"), "'problem_id' must be an integer"),
    ("bool_id", line(candidate_id=True), "'candidate_id' must be an integer"),
    ("bad_role", line(messages=[{"role": "tool", "content": "x"}]), "role must be one of"),
    ("no_assistant", line(messages=[{"role": "user", "content": "q"}]), "no assistant message"),
    ("empty_assistant", line(messages=[{"role": "user", "content": "q"},
                                       {"role": "assistant", "content": "  "}]),
     "empty assistant content"),
    ("content_not_str", line(messages=[{"role": "assistant", "content": 3}]),
     "content must be a string"),
    ("teacher_not_str", line(teacher=5), "'teacher' must be a string"),
]


@pytest.mark.parametrize("name,bad,match", BAD, ids=[b[0] for b in BAD])
def test_bad_record_names_file_and_line(tmp_path, name, bad, match):
    p = tmp_path / "pool.jsonl"
    p.write_text(line() + "\n\n" + bad + "\n")
    with pytest.raises(LarkError, match=f"pool.jsonl:3: .*{match}"):
        read_pool(p)


def test_duplicates_empty_and_non_utf8(tmp_path):
    p = tmp_path / "pool.jsonl"
    p.write_text(line() + "\n" + line() + "\n")
    with pytest.raises(LarkError, match=r"pool.jsonl:2: duplicate .*\(1, 0\)"):
        read_pool(p)
    p.write_text("\n \n")
    with pytest.raises(LarkError, match="pool is empty"):
        read_pool(p)
    p.write_bytes(line().encode() + b"\n" + b'{"x": "\xff\xfe"}\n')
    with pytest.raises(LarkError, match="pool.jsonl:2: not valid UTF-8"):
        read_pool(p)


def test_multi_megabyte_line_is_fine(tmp_path):
    p = tmp_path / "pool.jsonl"
    big = line(messages=[{"role": "user", "content": "q"},
                         {"role": "assistant", "content": "x" * 5_000_000}])
    p.write_text(big + "\n" + line(candidate_id=1) + "\n")
    recs = read_pool(p)
    assert len(recs) == 2 and len(recs[0].messages[1]["content"]) == 5_000_000


CLI_CASES = [BAD[0], BAD[6]]


@pytest.mark.parametrize("name,bad,match", CLI_CASES, ids=[b[0] for b in CLI_CASES])
def test_cli_score_bad_pool_one_line_no_output(tmp_path, name, bad, match):
    from lark_jax.models.tiny import make_tiny_student

    model = make_tiny_student(tmp_path / "m", "llama")
    p = tmp_path / "pool.jsonl"
    p.write_text(line() + "\n" + bad + "\n")
    out = tmp_path / "scores.json"
    r = subprocess.run([sys.executable, "-m", "lark_jax", "score", "--pool", str(p), "--student",
                        str(model), "--out", str(out), "-q"], capture_output=True, text=True)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and match.split(" .*")[0] in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("lark-jax score: error: ")
    assert not out.exists() and not list(tmp_path.glob("*.partial*"))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=4),
    max_leaves=12)
records = st.fixed_dictionaries(
    {}, optional={"problem_id": st.integers() | st.text(max_size=2),
                  "candidate_id": st.integers() | st.booleans(),
                  "teacher": st.text(max_size=3) | st.integers(),
                  "messages": st.lists(st.fixed_dictionaries(
                      {}, optional={"role": st.sampled_from(["user", "assistant", "system", "x"]),
                                    "content": st.text(max_size=4) | st.integers()}),
                      max_size=3) | json_values})


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(records, json_values))
def test_fuzz_parser_never_crashes_and_accepts_only_valid(obj):
    try:
        pid, cid, teacher, msgs = validate_record(obj, "fuzz:1")
    except LarkError as e:
        assert str(e).startswith("fuzz:1: ")
        return
    # Accepted: it must really be a valid record.
    assert type(pid) is int and type(cid) is int and isinstance(teacher, str)
    assert all(m["role"] in ("system", "user", "assistant") and isinstance(m["content"], str)
               for m in msgs)
    assert any(m["role"] == "assistant" and m["content"].strip() for m in msgs)
