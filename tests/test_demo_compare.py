"""Comparing demo runs (one student is one draw): the statistics lined up, their spread,
the intervals' half-width and whether two runs' intervals are disjoint, by hand; and the
CLI's ``demo --compare`` with its errors."""

import json

import pytest

from lark_jax import LarkError
from lark_jax.demo.compare import compare_runs, render_comparison, statistics


def _results(acc_lark, ci, paired=None, rho=None, extra_method=False):
    methods = [{"method": "lark", "acc": {"mean": acc_lark, "ci95": ci}}]
    if extra_method:
        methods.append({"method": "random", "acc": {"mean": 0.3, "ci95": [0.25, 0.35]}})
    corr = {} if rho is None else {"rho_vs_rate_sum": {
        "overall": {"r": rho, "ci95": [rho - 0.1, rho + 0.1]},
        "partial_given_tokens": {"r": None, "ci95": None}}}
    return {"base": {"acc": 0.05, "acc_ci95": [0.03, 0.07]},
            "student": {"pretrain_final_loss": 0.7},
            "methods": methods,
            "paired": {} if paired is None else {"lark - random": {"mean": paired,
                                                                   "ci95": [paired - 0.05,
                                                                            paired + 0.05]}},
            "diagnostics": {"correlations": corr, "spearman_ghat_vs_loss": float("nan")}}


def test_statistics_and_their_spread_by_hand():
    a = _results(0.40, [0.35, 0.45], paired=0.10, rho=0.5, extra_method=True)
    b = _results(0.50, [0.46, 0.56], paired=0.02, rho=0.2)
    c = _results(0.42, [0.30, 0.50])
    s = statistics(a)
    assert s["acc lark"] == {"value": 0.40, "ci95": [0.35, 0.45]}
    assert s["rho_vs_rate_sum overall"]["value"] == 0.5
    assert "rho_vs_rate_sum given T" not in s  # not measured (None)
    assert "spearman_ghat_vs_loss" not in s  # NaN
    t = compare_runs({"a": a, "b": b, "c": c})
    lark = t["acc lark"]
    assert lark["spread"] == pytest.approx(0.10)
    assert lark["half_width"] == pytest.approx((0.05 + 0.05 + 0.10) / 3)
    assert lark["disjoint"] is True  # a [0.35, 0.45] and b [0.46, 0.56]
    assert t["paired lark - random"]["spread"] == pytest.approx(0.08)
    assert t["paired lark - random"]["disjoint"] is False  # [0.05,0.15] vs [-0.03,0.07]
    assert set(t["paired lark - random"]["runs"]) == {"a", "b"}
    assert "acc random" not in t  # one run only
    assert t["student pre-training loss"]["half_width"] is None
    assert t["base acc"]["spread"] == 0 and t["base acc"]["disjoint"] is False
    md = render_comparison({"a": a, "b": b, "c": c}, t)
    assert "| acc lark | 40.0 [35.0, 45.0] | 50.0 [46.0, 56.0] | 42.0 [30.0, 50.0] | 10.0 " \
           "| 6.7 | **yes** |" in md
    assert "| paired lark - random | +10.0 [+5.0, +15.0] | +2.0 [-3.0, +7.0] | - |" in md


def test_cli_compare_writes_both_files_and_refuses_bad_input(tmp_path, capsys):
    from lark_jax.cli import main

    for name, acc in (("s0", 0.4), ("s1", 0.5)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(_results(acc, [acc - .05,
                                                                                acc + .05])))
    out = tmp_path / "cmp"
    assert main(["demo", "-q", "--compare", f"first={tmp_path / 's0'}", str(tmp_path / "s1"),
                 "--out", str(out)]) == 0
    got = json.loads((out / "comparison.json").read_text())
    assert got["statistics"]["acc lark"]["runs"]["first"]["value"] == 0.4
    assert set(got["statistics"]["acc lark"]["runs"]) == {"first", "s1"}
    assert "| acc lark |" in (out / "comparison.md").read_text()
    capsys.readouterr()
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "results.json").write_text('{"methods": [\n  1,,\n]}')
    for argv, msg in (([str(tmp_path / "s0")], "at least two"),
                      ([str(tmp_path / "s0"), str(tmp_path / "nothing")], "no results.json"),
                      ([str(tmp_path / "s0"), str(tmp_path / "bad")], "results.json:2"),
                      ([str(tmp_path / "s0"), f"x={tmp_path / 's1'}", f"x={tmp_path / 's0'}"],
                       "given twice")):
        assert main(["demo", "--compare", *argv, "--out", str(tmp_path / "o2")]) == 2
        err = capsys.readouterr().err
        assert msg in err and "Traceback" not in err, err
    with pytest.raises(LarkError, match="at least two"):  # the library raises, never prints
        from types import SimpleNamespace

        from lark_jax.demo.command import _compare
        _compare(SimpleNamespace(compare=["x"], out=str(tmp_path)), None)
