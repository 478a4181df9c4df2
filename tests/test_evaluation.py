"""Evaluation: answer extraction, equivalence, pass@k oracles, benchmarks, the eval run, CLI."""

import argparse
import dataclasses
import itertools
import json
import sys
import threading
import time
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lark_jax import LarkError
from lark_jax.evaluation import (
    EvalConfig,
    acc_at_k,
    command,
    extract_answer,
    is_equivalent,
    load_benchmark,
    markdown_table,
    mean_pass_at_1,
    mean_pass_at_k,
    pass_at_k,
    run_eval,
    summarize,
)
from lark_jax.evaluation import answers as answers_mod
from lark_jax.evaluation.bench import DEFAULT_SYSTEM_PROMPT, chat_prompts
from lark_jax.progress import Reporter

# -- extraction ------------------------------------------------------------------------


@pytest.mark.parametrize("text, want", [
    ("so \\boxed{\\frac{a}{\\sqrt{b^{2}}}} done", "\\frac{a}{\\sqrt{b^{2}}}"),  # nested
    ("first \\boxed{3}, then \\boxed{4}", "3"),  # several boxes: the first
    ("<think>try \\boxed{3}</think> final \\boxed{4}", "4"),  # reasoning block dropped
    ("<THINK>a</THINK><think>b \\boxed{1}</think>ans \\boxed{2}", "2"),
    ("reasoning 1 2 3 \\boxed{9}</think> so \\boxed{5}", "5"),  # template opened the block
    ("answer 7 <think> still thinking \\boxed{3}", "7"),  # cut off mid-reasoning
    ("<think>only thoughts, 12</think>", ""),
    ("no box: 12 apples and -3.5 pears.", "-3.5"),  # fallback: the last number
    ("the total is 1,000,000 dollars", "1,000,000"),
    ("ratio 3/4 here", "3/4"),
    ("x-3 = 0 means it is 5", "5"),
    ("nothing numeric here", ""),
    ("$\\boxed{\\{1,2\\}}$", "\\{1,2\\}"),  # escaped braces are content
    ("\\boxed 7$.", "7"),  # one-token argument without braces
    ("\\boxed{} then 8", "8"),  # empty box ignored
    ("\\fbox{x+1}", "x+1"),
    ("cut off \\boxed{12", "12"),  # unclosed box: the number fallback
    ("\\boxed{-\\dfrac{1}{2}}", "-\\dfrac{1}{2}"),
    ("\\boxed{\\text{(B)}}", "\\text{(B)}"),
])
def test_extract_answer(text, want):
    assert extract_answer(text) == want


# -- equivalence -----------------------------------------------------------------------

EQUIVALENT = [
    ("0.5", "1/2"), ("1/2", "\\frac{1}{2}"), ("\\frac12", "0.5"), ("\\dfrac{1}{2}", "\\frac{1}{2}"),
    (".5", "0.50"), ("-\\frac{1}{2}", "-0.5"), ("\\frac{-1}{2}", "-1/2"), ("3.0", "3"),
    ("5\\text{ cm}", "5"), ("5 cm", "5"), ("12 \\mbox{ inches}^2", "12"),
    ("\\frac{1}{2}\\text{ m}", "0.5"), ("50\\%", "50"), ("50%", "0.5"), ("10^\\circ", "10"),
    ("10^{\\circ}", "10"), ("1,000", "1000"), ("1{,}000", "1000"), ("10\\,000", "10000"),
    ("\\$5", "5"), ("$x = 5$", "5"), ("\\left( 1, 2 \\right)", "(1,2)"), ("x + 1", "x+1"),
    ("\\text{(B)}", "B"), ("\\sqrt2/2", "\\frac{\\sqrt{2}}{2}"), ("2\\sqrt{3}", "\\sqrt{12}"),
    ("\\{1,2\\}", "\\{2,1\\}"), ("-3", "-3"), ("\\boxed{5}", "5"), ("\\pi", "\\pi"),
    ("\\text{Monday}", "Monday"), ("  7.  ", "7"),
]

NOT_EQUIVALENT = [
    ("1/2", "2"), ("2", "\\frac{1}{2}"), ("-3", "3"), ("3", "-3"), ("0.05", "0.5"),
    ("10", "100"), ("\\sqrt{2}", "2"), ("x+1", "x-1"), ("(A)", "B"), ("", "0"), ("0", ""),
    ("\\frac{1}{2}", "\\frac{2}{1}"), ("12", "1,2"), ("2x", "2"), ("2\\pi", "\\pi"),
    ("[0,1]", "[0,1)"), ("5 cm", "50"),
]


@pytest.mark.parametrize("pred, gold", EQUIVALENT)
def test_equivalent(pred, gold):
    assert is_equivalent(pred, gold)


@pytest.mark.parametrize("pred, gold", NOT_EQUIVALENT)
def test_not_equivalent(pred, gold):
    assert not is_equivalent(pred, gold)


@settings(max_examples=40, deadline=None)
@given(st.integers(-10_000, 10_000), st.integers(1, 999), st.integers(1, 50),
       st.integers(1, 10))
def test_fractions_agree_in_every_form(a, b, m, d):
    value = Fraction(a, b)
    assert is_equivalent(f"{a}/{b}", f"\\frac{{{a * m}}}{{{b * m}}}")
    assert is_equivalent(f"\\dfrac{{{a}}}{{{b}}}", f"{a * m}/{b * m}")
    if value.denominator in (1, 2, 4, 5, 8, 10):  # terminating decimals
        assert is_equivalent(f"{float(value)}", f"\\frac{{{a}}}{{{b}}}")
    assert not is_equivalent(f"{a}/{b}", f"{a + d * b}/{b}")  # differs by d != 0


def test_pathological_answers_are_refused_quickly_and_off_the_main_thread():
    """9^{9^9} parses unevaluated but would hang SymPy; the guard refuses it in milliseconds."""
    t0 = time.perf_counter()
    for pred in ("9^{9^{9}}", "1000000!", "x^{100000}+1", "(" * 300 + ")" * 300,
                 "1e999999999", "10^{10^{10}}-1", "2^{-10^{9}}"):
        assert not is_equivalent(pred, "1")
    assert time.perf_counter() - t0 < 20
    # No signal-based timeout: it works from a worker thread too.
    got = []
    worker = threading.Thread(target=lambda: got.append(is_equivalent("\\frac{3}{4}", "0.75")))
    worker.start()
    worker.join(60)
    assert got == [True]


def test_equivalence_prints_nothing(capsys, monkeypatch):
    """math_verify's once-per-process 'timeout disabled' warning is filtered, not printed."""
    import math_verify.grader
    import math_verify.parser

    monkeypatch.setattr(math_verify.parser, "TIMEOUT_WARNING_SHOWN", False)
    monkeypatch.setattr(math_verify.grader, "TIMEOUT_WARNING_SHOWN", False)
    answers_mod._mv_parse.cache_clear()
    assert is_equivalent("\\sqrt{8}", "2\\sqrt{2}")
    assert capsys.readouterr() == ("", "")


# -- metrics ---------------------------------------------------------------------------


def brute_pass_at_k(n, c, k):
    """Share of the k-subsets of n samples (the first c correct) holding a correct one."""
    subsets = list(itertools.combinations(range(n), k))
    return Fraction(sum(any(i < c for i in s) for s in subsets), len(subsets))


def test_pass_at_k_matches_subset_enumeration():
    for n in range(1, 8):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(float(brute_pass_at_k(n, c, k)),
                                                           abs=1e-12)


def test_pass_at_k_rejects_bad_arguments():
    for n, c, k in [(5, 6, 1), (5, -1, 1), (5, 2, 0), (5, 2, 6)]:
        with pytest.raises(ValueError):
            pass_at_k(n, c, k)
    assert pass_at_k(200, 1, 1) == pytest.approx(1 / 200)  # exact binomials, large n


def test_metrics_by_hand():
    t, f = True, False
    table = [[t, f, f, f, f], [f, f, f, f, f], [t, t, t, t, t], [f, t, f, t, f]]
    assert acc_at_k(table) == 3 / 4
    assert mean_pass_at_1(table) == pytest.approx((1 + 0 + 5 + 2) / 20)
    # pass@2 per problem: 1 - C(4,2)/C(5,2) = 0.4; 0; 1; 1 - C(3,2)/C(5,2) = 0.7.
    assert mean_pass_at_k(table, 2) == pytest.approx((0.4 + 0 + 1 + 0.7) / 4)
    assert mean_pass_at_k(table, 5) == acc_at_k(table)  # pass@n is ACC@n
    assert mean_pass_at_k(table, 1) == pytest.approx(mean_pass_at_1(table))
    s = summarize(table, ["Level 2", "Level 10", "Level 2", None])
    assert s["n_problems"] == 4 and s["samples"] == 5 and s["n_correct_samples"] == 8
    assert s["acc@5"] == 3 / 4 and set(s["pass@k"]) == {"1", "2", "3", "4", "5"}
    assert list(s["by_level"]) == ["Level 2", "Level 10", "none"]  # natural order
    assert s["by_level"]["Level 2"] == {"n_problems": 2, "acc@5": 1.0, "pass@1": 0.6}
    assert "by_level" not in summarize(table)
    with pytest.raises(ValueError):
        summarize([[t, f], [t]])


def test_markdown_table():
    def summ(model, bench, acc, levels=None):
        s = {"model": model, "benchmark": bench, "samples": 5, "acc@5": acc, "pass@1": acc / 2}
        if levels:
            s["by_level"] = {lv: {"acc@5": v, "pass@1": v / 2} for lv, v in levels.items()}
        return s

    table = markdown_table([summ("base", "aime24", 0.1), summ("base", "math500", 0.5, {"1": 0.9}),
                            summ("lark", "aime24", 0.2)], by_level=True)
    lines = table.splitlines()
    assert lines[0] == "| model (ACC@5, %) | aime24 | math500 | math500 1 | avg |"
    assert lines[2] == "| base | 10.0 | 50.0 | 90.0 | 30.0 |"
    assert lines[3] == "| lark | 20.0 | - | - | - |"  # incomplete row: no average
    p1 = markdown_table([summ("base", "aime24", 0.1)], metric="pass@1").splitlines()
    assert p1[2] == "| base | 5.0 | 5.0 |"


# -- benchmark files -------------------------------------------------------------------


def test_benchmark_formats(tmp_path):
    j = tmp_path / "b.json"
    j.write_text(json.dumps([{"prompt": "p0", "answer": "1"},
                             {"problem": "p1", "answer": 42, "level": 3}]))
    b = load_benchmark(j)
    assert b.name == "b" and [p.prompt for p in b.problems] == ["p0", "p1"]
    assert [p.answer for p in b.problems] == ["1", "42"]
    assert [p.level for p in b.problems] == [None, "3"]
    jl = tmp_path / "c.jsonl"
    jl.write_text('{"prompt": "a", "answer": "x"}\n\n{"problem": "b", "answer": "0.5"}\n')
    assert [p.index for p in load_benchmark(jl).problems] == [0, 1]


@pytest.mark.parametrize("content, where", [
    ("", "empty"),
    ("  \n", "empty"),
    ("[]", "no problems"),
    ('[{"prompt": "a", "answer": "1"},\n {"prompt": "b" "answer": "2"}]', "line 2 column"),
    ('{"prompt": "a", "answer": "1"}\n{"prompt": "b", "answer": }\n', "line 2: malformed"),
    ('[{"prompt": "a", "answer": "1"}, {"prompt": "b"}]', "item 1: missing 'answer'"),
    ('{"prompt": "a", "answer": "1"}\n\n{"answer": "1"}\n',
     "line 3: has neither 'problem' nor 'prompt'"),
    ('[{"prompt": 5, "answer": "1"}]', "item 0: 'prompt' must be"),
    ('[{"prompt": "a", "answer": true}]', "item 0: 'answer' must be"),
    ('[{"prompt": "a", "answer": ["1"]}]', "item 0: 'answer' must be"),
    ('[{"prompt": "a", "answer": "  "}]', "item 0: 'answer' is empty"),
    ('[{"prompt": "a", "answer": "1", "level": 1.5}]', "item 0: 'level'"),
    ('["just a string"]', "item 0: expected an object"),
    ('{\n "problems": []\n}\n', "multi-line JSON dict"),
])
def test_bad_benchmarks_name_file_and_place(tmp_path, content, where):
    path = tmp_path / "bench.json"
    path.write_text(content)
    with pytest.raises(LarkError) as e:
        load_benchmark(path)
    assert str(path) in str(e.value) and where in str(e.value)


def test_missing_and_binary_benchmark(tmp_path):
    with pytest.raises(LarkError, match="cannot read"):
        load_benchmark(tmp_path / "nope.json")
    bad = tmp_path / "bin.json"
    bad.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(LarkError, match="UTF-8"):
        load_benchmark(bad)


# -- the eval run on a tiny student ----------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    import lark_jax
    from lark_jax.models.tiny import make_tiny_student

    d = make_tiny_student(tmp_path_factory.mktemp("eval") / "tiny", "qwen2")
    return d, lark_jax.load_student(d)


def write_bench(path, n=5):
    rows = [{"prompt": f"What is {i} + {i}?", "answer": str(2 * i), "level": 1 + i % 2}
            for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def read_rows(path):
    return sorted((json.loads(x) for x in path.read_text().splitlines()),
                  key=lambda r: (r["problem"], r["sample"]))


CFG = EvalConfig(samples=3, temperature=1.0, top_p=0.95, max_new_tokens=8, seed=3,
                 batch_size=6)  # six slots for fifteen samples: slots are refilled


def test_chat_prompts_use_the_template(tiny, tmp_path):
    _, student = tiny
    p = load_benchmark(write_bench(tmp_path / "b.jsonl"))
    with_sys, without = (chat_prompts(student.tokenizer, p.problems[:1], sp)[0]
                         for sp in (DEFAULT_SYSTEM_PROMPT, ""))
    assert with_sys == (f"<|im_start|>system\n{DEFAULT_SYSTEM_PROMPT}<|im_end|>\n"
                        "<|im_start|>user\nWhat is 0 + 0?<|im_end|>\n<|im_start|>assistant\n")
    assert without == "<|im_start|>user\nWhat is 0 + 0?<|im_end|>\n<|im_start|>assistant\n"


def test_sampling_is_seeded_and_resume_is_exact(tiny, tmp_path):
    _, student = tiny
    bench = load_benchmark(write_bench(tmp_path / "arith.jsonl"))
    a = run_eval(student, bench, tmp_path / "a", CFG)
    b = run_eval(student, bench, tmp_path / "b", CFG)
    gens = read_rows(tmp_path / "a" / "generations.jsonl")
    assert len(gens) == 15 and gens == read_rows(tmp_path / "b" / "generations.jsonl")
    assert a.summary == b.summary and a.n_generated == 15
    # Different rows of one prompt are different samples.
    assert any(len({g["completion"] for g in gens if g["problem"] == i}) > 1 for i in range(5))
    other = run_eval(student, bench, tmp_path / "c",
                     dataclasses.replace(CFG, seed=4))
    assert read_rows(tmp_path / "c" / "generations.jsonl") != gens
    assert other.summary["settings"]["seed"] == 4

    # Interrupt after four samples, leave a torn line as a crash would, then resume.
    calls = []

    def stop_after_four(n):
        calls.append(n)
        if len(calls) == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_eval(student, bench, tmp_path / "r", CFG, progress=stop_after_four)
    gen_file = tmp_path / "r" / "generations.jsonl"
    assert calls == [1] * 4 and len(gen_file.read_text().splitlines()) == 4
    with open(gen_file, "a") as f:
        f.write('{"problem": 2, "sample": 0, "compl')
    with pytest.raises(LarkError, match="--resume"):
        run_eval(student, bench, tmp_path / "r", CFG)
    with pytest.raises(LarkError, match="seed"):
        run_eval(student, bench, tmp_path / "r", dataclasses.replace(CFG, seed=9),
                 resume=True)
    seen = []
    r = run_eval(student, bench, tmp_path / "r", CFG, resume=True, progress=seen.append)
    assert (r.n_resumed, r.n_generated, seen) == (4, 11, [4] + [1] * 11)
    assert read_rows(gen_file) == gens
    for name in ("answers.jsonl", "summary.json"):
        assert (tmp_path / "r" / name).read_text() == (tmp_path / "a" / name).read_text()
    # Resuming a finished run only re-checks the answers.
    again = run_eval(student, bench, tmp_path / "r", CFG, resume=True)
    assert (again.n_generated, again.n_resumed) == (0, 15)


def test_answers_and_summary_from_known_completions(tiny, tmp_path, monkeypatch):
    """With generation replaced by canned texts, the files hold hand-computable results."""
    _, student = tiny
    bench = load_benchmark(write_bench(tmp_path / "arith.jsonl", n=3))
    canned = {0: ["\\boxed{0}", "no idea", "<think>\\boxed{0}</think> 1"],  # 1 of 3 correct
              1: ["so it is 2.", "\\boxed{\\frac{4}{2}}", "\\boxed{2.0}"],  # 3 of 3
              2: ["\\boxed{-4}", "4 is wrong, \\boxed{5}", ""]}  # 0 of 3

    tok = student.tokenizer

    def fake_generate_ids(student, prompt_ids, max_new, temperature, top_p, seed, *,
                          batch_size, repetition_penalty, keys, stop, on_result):
        for j, key in reversed(list(enumerate(keys))):  # finishing order does not matter
            i, s = divmod(key, 3)
            assert f"What is {i} + {i}?" in tok.decode(prompt_ids[j])
            on_result(j, tok(canned[i][s], add_special_tokens=False)["input_ids"])

    # Patched on the module that generation calls it from.
    monkeypatch.setattr(sys.modules["lark_jax.models.generate"], "generate_ids",
                        fake_generate_ids)
    cfg = dataclasses.replace(CFG, stop_at_boxed=False)
    res = run_eval(student, bench, tmp_path / "out", cfg, model_name="canned")
    rows = [json.loads(x) for x in (tmp_path / "out" / "answers.jsonl").read_text().splitlines()]
    assert [r["correct"] for r in rows] == [True, False, False, True, True, True,
                                            False, False, False]
    assert [r["extracted"] for r in rows[:3]] == ["0", "", "1"]
    assert rows[0] == {"problem": 0, "sample": 0, "extracted": "0", "gold": "0",
                       "correct": True, "level": "1", "extracted_reference": "0",
                       "correct_math": True, "correct_reference": True}
    # The reference's grader: the first box even inside <think>, the last number otherwise,
    # exact strings after its normalisation (2.0 -> 2, but \frac{4}{2} != 2).
    assert [r["correct_reference"] for r in rows] == [True, False, True, True, False, True,
                                                      False, False, False]
    s = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert s == res.summary
    assert (s["model"], s["benchmark"], s["n_problems"], s["samples"]) == ("canned", "arith",
                                                                             3, 3)
    assert s["acc@3"] == pytest.approx(2 / 3) and s["pass@1"] == pytest.approx(4 / 9)
    assert s["pass@k"]["2"] == pytest.approx((2 / 3 + 1 + 0) / 3)  # 1 - C(2,2)/C(3,2) = 2/3
    assert s["by_level"] == {"1": {"n_problems": 2, "acc@3": 0.5, "pass@1": pytest.approx(1 / 6)},
                             "2": {"n_problems": 1, "acc@3": 1.0, "pass@1": 1.0}}
    assert s["no_answer_samples"] == 2
    assert s["grader"] == "math" and s["graders"]["math"]["acc@3"] == s["acc@3"]
    assert s["graders"]["reference"]["acc@3"] == pytest.approx(2 / 3)
    assert s["graders"]["reference"]["pass@1"] == pytest.approx(4 / 9)
    ref = run_eval(student, bench, tmp_path / "ref", dataclasses.replace(cfg, grader="reference"))
    assert ref.summary["grader"] == "reference" and ref.summary["pass@1"] == pytest.approx(4 / 9)


# -- the command -----------------------------------------------------------------------


def parse(argv):
    p = argparse.ArgumentParser()
    command.add_arguments(p)
    return p.parse_args(argv)


def test_command_end_to_end_and_aggregate(tiny, tmp_path, capsys):
    model_dir, _ = tiny
    bench = write_bench(tmp_path / "arith.jsonl", n=3)
    sys_file = tmp_path / "sys.txt"
    sys_file.write_text("Answer in a box.\n")
    common = ["--model", str(model_dir), "--benchmark", str(bench), "--samples", "2",
              "--max-new-tokens", "6", "--batch-size", "8"]
    command.run(parse(common + ["--out", str(tmp_path / "e1"), "--system-prompt-file",
                                str(sys_file)]), Reporter(quiet=True))
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 and "acc@2" in out[0] and "arith" in out[0]
    for name in ("generations.jsonl", "answers.jsonl", "summary.json"):
        assert (tmp_path / "e1" / name).is_file()
    assert len((tmp_path / "e1" / "answers.jsonl").read_text().splitlines()) == 6
    settings_ = json.loads((tmp_path / "e1" / "run.json").read_text())
    assert settings_["system_prompt"] == "Answer in a box."
    assert settings_["temperature"] == 0.6 and settings_["top_p"] == 0.95
    # the reference's protocol by default, recorded
    assert (settings_["repetition_penalty"], settings_["stop_at_boxed"],
            settings_["grader"]) == (1.1, True, "math")
    assert parse(["--model", "m"]).max_new_tokens == 8192
    for bad, msg in ((["--repetition-penalty", "-1"], "--repetition-penalty must be"),
                     (["--stop", ""], "--stop strings must be non-empty")):
        with pytest.raises(LarkError, match=msg):
            command.run(parse(common + ["--out", str(tmp_path / "bad"), *bad]),
                        Reporter(quiet=True))
        assert not (tmp_path / "bad").exists()

    command.run(parse(common + ["--out", str(tmp_path / "e2"), "--name", "other", "--seed",
                                "1", "--temperature", "0"]), Reporter(quiet=True))
    capsys.readouterr()
    command.run(parse(["--aggregate", str(tmp_path / "e1"), str(tmp_path / "e2"),
                       "--by-level"]), Reporter(quiet=True))
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert lines[0] == "| model (ACC@2, %) | arith | arith 1 | arith 2 | avg |"
    assert [ln.split(" | ")[0] for ln in lines[2:4]] == ["| tiny", "| other"]
    assert len(lines) == 4  # stdout is the table alone; the summary is on stderr
    assert captured.err.splitlines()[-1].startswith("tabulated 2 eval run(s)")

    with pytest.raises(LarkError, match="--model"):
        command.run(parse(["--aggregate", str(tmp_path / "e1"), "--model", "m"]),
                    Reporter(quiet=True))
    with pytest.raises(LarkError, match="both hold"):
        command.run(parse(["--aggregate", str(tmp_path / "e1"), str(tmp_path / "e1")]),
                    Reporter(quiet=True))
    with pytest.raises(LarkError, match="summary.json"):
        command.run(parse(["--aggregate", str(tmp_path)]), Reporter(quiet=True))
    with pytest.raises(LarkError, match="missing --benchmark, --out"):
        command.run(parse(["--model", str(model_dir)]), Reporter(quiet=True))
    with pytest.raises(LarkError, match="--samples"):
        command.run(parse(common + ["--out", str(tmp_path / "e3"), "--samples", "0"]),
                    Reporter(quiet=True))


def test_problem_wins_over_prompt(tmp_path):
    path = tmp_path / "b.json"
    path.write_text(json.dumps([{"prompt": "P", "problem": "Q", "answer": "1"},
                                {"prompt": "only prompt", "answer": "2"}]))
    assert [p.prompt for p in load_benchmark(path).problems] == ["Q", "only prompt"]


def test_resume_merges_the_parts_of_a_multi_process_run(tiny, tmp_path):
    """A 2-process run that died leaves generations.p0/p1.jsonl (one with a torn line);
    resuming (here on one process) merges them and draws only the missing samples."""
    _, student = tiny
    bench = load_benchmark(write_bench(tmp_path / "arith.jsonl"))
    run_eval(student, bench, tmp_path / "a", CFG)
    rows = (tmp_path / "a" / "generations.jsonl").read_text().splitlines(keepends=True)
    b = tmp_path / "b"
    b.mkdir()
    (b / "run.json").write_text((tmp_path / "a" / "run.json").read_text())
    (b / "generations.p0.jsonl").write_text("".join(rows[0:8:2]) + rows[8][:10])
    (b / "generations.p1.jsonl").write_text("".join(rows[1:8:2]))
    res = run_eval(student, bench, b, CFG, resume=True)
    assert res.n_resumed == 8 and res.n_generated == 7
    assert read_rows(b / "generations.jsonl") == read_rows(tmp_path / "a" / "generations.jsonl")
    assert not list(b.glob("generations.p*"))
