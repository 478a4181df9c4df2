"""Resuming a run: the one rule for comparing a run's saved settings with new ones.

``score``, ``train`` and ``eval`` each save the settings a run was started with
(the score sidecar's header, ``run_config.json``, ``run.json``) and refuse
``--resume`` when anything that changes the result differs, naming every
differing field. What may change, and what a missing key meant in an older
file, is each command's own list; how the comparison is made is here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

from lark_jax.errors import LarkError


def differences(old: Mapping, new: Mapping, *, may_change: Iterable[str] = (),
                old_defaults: Mapping | None = None,
                same: Mapping[str, Callable[[object, object], bool]] | None = None,
                name: Callable[[str], str] = str) -> list[str]:
    """``"name: old != new"`` for every key of either mapping whose values differ.

    ``may_change``: keys not compared. ``old_defaults``: what a key missing from ``old``
    (a file written before the setting existed) meant. ``same``: per-key equality
    (e.g. paths compared after resolving). ``name``: how a key is shown (e.g. as a flag).
    """
    old = {**(old_defaults or {}), **old}
    skip = set(may_change)
    same = same or {}
    out = []
    for k in sorted((set(old) | set(new)) - skip):
        a, b = old.get(k), new.get(k)
        if not same.get(k, lambda x, y: x == y)(a, b):
            out.append(f"{name(k)}: {a!r} != {b!r}")
    return out


def check_resume(old: Mapping, new: Mapping, *, message: str, where: str, **how) -> None:
    """Raise one ``LarkError`` listing every difference (see :func:`differences`)."""
    diffs = differences(old, new, **how)
    if diffs:
        raise LarkError(message.format(diffs="; ".join(diffs)), where=where)
