"""One default in one place: every CLI option of score, train, eval and select that sets a
config field must default to that field's default (and offer exactly its valid values)."""

import argparse
import dataclasses
import inspect

import pytest

from lark_jax.cli import build_parser
from lark_jax.evaluation.runner import GRADERS, EvalConfig
from lark_jax.learnability.runner import ScoreConfig
from lark_jax.models.decoder import ATTN_IMPLS
from lark_jax.selection import select
from lark_jax.training.data import SYSTEM_TURNS
from lark_jax.training.objective import OBJECTIVES
from lark_jax.training.trainer import TrainConfig

# Options whose CLI default is a stand-in resolved later, with the reason.
STAND_INS = {
    ("eval", "system_prompt"): "None = the default prompt (or --system-prompt-file)",
    ("select", "solver"): "None = closed-form; 'not given' lets baselines refuse --solver",
}
VALID = {"objective": OBJECTIVES, "system_turn": SYSTEM_TURNS, "grader": GRADERS,
         "attention": ATTN_IMPLS}


def field_defaults(target) -> dict:
    if dataclasses.is_dataclass(target):
        return {f.name: f.default for f in dataclasses.fields(target)
                if f.default is not dataclasses.MISSING}
    return {k: p.default for k, p in inspect.signature(target).parameters.items()
            if p.default is not inspect.Parameter.empty}


def sub_actions(command: str) -> list[argparse.Action]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[command]._actions


@pytest.mark.parametrize("command, target", [("score", ScoreConfig), ("train", TrainConfig),
                                             ("eval", EvalConfig), ("select", select)])
def test_cli_defaults_are_the_config_defaults(command, target):
    defaults = field_defaults(target)
    checked = 0
    for action in sub_actions(command):
        if action.dest not in defaults or (command, action.dest) in STAND_INS:
            continue
        want = defaults[action.dest]
        got = action.default
        if isinstance(want, tuple):  # e.g. stop strings: a tuple in the config, a list here
            got = tuple(got)
        assert got == want, f"{command} {action.option_strings}: CLI {got!r} != config {want!r}"
        if action.dest in VALID and action.choices is not None:
            assert tuple(action.choices) == tuple(VALID[action.dest]), action.option_strings
        checked += 1
    assert checked >= {"score": 8, "train": 20, "eval": 9, "select": 4}[command]
