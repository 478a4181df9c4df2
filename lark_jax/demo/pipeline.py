"""The demo pipeline: task -> student -> score -> select -> fine-tune -> evaluate -> report.

``run_demo(out_dir, quick=...)`` runs the whole LARK recipe on the embedded task with the
project's own stages (``score_pool``, ``selection.select``, ``train``, ``run_eval``) and
writes ``results.md``, ``results.json`` and two PNG plots. What is measured:

Per method (LARK and the baselines, one selection per seed, budget B per problem; all
methods fine-tune the same cached student for the same number of epochs, as published, so
that 'all' takes K times the steps of a budget-1 selection, or, with ``steps``, for the same
number of optimizer steps; 'all-equal-steps' trains on every candidate for a budget-B
selection's steps, the same compute):

* ``acc@k`` and ``pass@1`` on the held-out benchmark: k samples per problem at temperature
  ``temperature`` / ``top_p``, first ``\\boxed{}`` answer (or last number) checked with
  ``is_equivalent`` (``lark_jax.evaluation.run_eval``).
* ``bare`` and ``worked_pass@1``: the share of samples that are only a boxed number, and
  the accuracy of the others (those that show work). With answers in 1..20 a student can
  reach a sizeable ACC@k by recalling frequent answers; these two say how much of a
  method's ACC is solving (``stages.answer_styles``).
* ``guess`` (one row, no model): ACC@k of answering every benchmark problem with the k
  commonest answers of the pool's problems (``stats.guess_floor``), the floor a student
  reaches without reading the problems; the headline says whether the best method's
  interval lies above it.
* ``ref_loss``: mean cross-entropy per assistant token of the fine-tuned student on the
  benchmark's *reference solutions* (one ``a op b = r.`` per operation, then the boxed
  answer; no teacher writes exactly this). Lower is better. It measures style as well as
  arithmetic: fine-tuning towards any one teacher's style can raise it.
* ``step_acc``: share of intermediate results ``r`` of those reference solutions that the
  student predicts exactly (greedy, teacher-forced on the reference prefix): can it do the
  arithmetic, whatever it would write on its own. Informative when ACC@k is near 0.

Diagnostics (the paper's two plots):

* SFT loss curves of every method (seed of the first run) on one chart.
* LARK score vs measured training utility. Per teacher: the LARK score is the mean ĝ of the
  teacher's trajectories; its *utility* is the drop of ``ref_loss`` (base student minus
  student fine-tuned only on that teacher's pool trajectories, same epochs, lr and batch as
  the methods, first seed). Per trajectory: ρ_k = Brier/L, LARK's predicted rate of loss
  decrease, against the measured rate ``log(L_before / L_after)`` of the same trajectory
  after the ``all`` run (fine-tuning on the whole pool). Spearman correlations of both.

Statistics: ACC is a 0/1 outcome per (seed, problem); every method's ACC has a 95 %
bootstrap interval over problems and seeds, and LARK − random, LARK − all and LARK −
all-equal-steps are paired differences with their intervals (``demo.stats``). The table
has LARK twice: trained with the ``record`` objective and with the published runs'
``reference`` one.

Also measured: Spearman(ĝ, L) and Spearman(ρ, L) over trajectories (does LARK do more
than rank by loss?), and the proxy ρ = Brier/L against the exact rate ‖∇θ L‖²/L of
``--estimator gradient``.

The stages live in ``demo.stages`` (one typed ``DemoContext``), the table and plots in
``demo.report``.

Seeds vary the training data order, the random baseline's choice and the evaluation's
sampling; the task, the student and the scores are the same for every seed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import time
from pathlib import Path

import jax

from lark_jax import fsio
from lark_jax.demo import report, stages
from lark_jax.demo.config import METHOD_SPECS, METHODS, DemoConfig, demo_config
from lark_jax.demo.estimate import REFERENCE_MACHINE, estimate
from lark_jax.demo.student import cache_root
from lark_jax.errors import LarkError

__all__ = ["METHODS", "METHOD_SPECS", "DemoConfig", "DemoResult", "demo_config", "run_demo"]

MARKER = "demo.json"  # identifies a directory written by run_demo (safe to overwrite)
OWNED = ("task", "scores.json", "selections", "runs", "evals", "utility", "diagnostics",
         "plots", "results.md", "results.json", MARKER)


class _Silent:
    """The reporter used when none is given: no output at all."""

    @contextlib.contextmanager
    def bar(self, total, desc, unit="it"):
        yield lambda n=1, total=None, **postfix: None

    def info(self, msg: str) -> None:
        pass


@contextlib.contextmanager
def compilation_cache(path: Path | None):
    """Use JAX's persistent compilation cache in ``path`` for the duration (unless the user
    configured one already): the demo's many fine-tunes and evaluations compile the same
    programs again and again, and XLA compilation dominates their time on a CPU."""
    if path is None or jax.config.jax_compilation_cache_dir:
        yield
        return
    from jax.experimental.compilation_cache import compilation_cache as cc

    old_min = jax.config.jax_persistent_cache_min_compile_time_secs
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    try:
        yield
    finally:
        jax.config.update("jax_compilation_cache_dir", None)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", old_min)
        cc.reset_cache()


def _prepare_out(out: Path) -> None:
    """Create ``out``; a directory from an earlier demo run is cleared, anything else refused."""
    if out.is_symlink():
        raise LarkError("refusing to write through a symbolic link", where=str(out))
    if out.exists() and not out.is_dir():
        raise LarkError("output path exists and is not a directory", where=str(out))
    if out.exists() and any(out.iterdir()):
        if not (out / MARKER).is_file():
            raise LarkError("output directory is not empty and holds no earlier demo run; "
                            "choose another --out", where=str(out))
        for name in OWNED:
            p = out / name
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            elif p.exists() or p.is_symlink():
                p.unlink()
    out.mkdir(parents=True, exist_ok=True)


@dataclasses.dataclass
class DemoResult:
    out_dir: Path
    results: dict  # what results.json holds
    markdown: str  # what results.md holds
    plots: dict[str, Path]
    seconds: float


def _estimate(ctx) -> dict[str, float]:
    """The run's time per stage on the reference machine (``demo.estimate``)."""
    import collections

    from lark_jax.demo.student import is_built, student_path

    cfg = ctx.cfg
    cached = not ctx.rebuild_student and is_built(
        student_path(cfg.student, cfg.task.corpus_recipe(), ctx.cache_dir))
    per_teacher = collections.Counter(r["teacher"] for r in ctx.task.pool)
    return estimate(cfg, len(ctx.task.pool), dict(per_teacher), cached)


def run_demo(out_dir: str | os.PathLike = "lark-jax-demo", *, quick: bool = True,
             tiny: bool = False, seeds=None, config: DemoConfig | None = None, mesh=None,
             cache_dir: str | os.PathLike | None = None, rebuild_student: bool = False,
             reporter=None, persistent_compilation_cache: bool = True) -> DemoResult:
    """Run the demo end to end and write its results into ``out_dir``.

    Args:
      out_dir: output directory (created; a directory of an earlier demo run is cleared).
      quick / tiny / seeds: preset choice (see :func:`demo_config`); ``config`` overrides them.
      mesh: the device mesh for every stage (default: all devices on "data").
      cache_dir: where the student is cached (default ``$LARK_JAX_CACHE`` or
        ``~/.cache/lark-jax``).
      rebuild_student: build the student even if a cached one exists.
      reporter: an object with ``bar(total, desc, unit)`` (a context manager yielding
        ``advance(n, total=None, **postfix)``) and ``info(msg)``, such as
        ``lark_jax.progress.Reporter``; default silent.
      persistent_compilation_cache: cache compiled XLA programs under the cache directory
        while the demo runs (see :func:`compilation_cache`); a cache the user configured
        is used as is.
    """
    from lark_jax.parallel import make_mesh, mesh_summary

    cfg = config if config is not None else demo_config(quick, tiny=tiny, seeds=seeds)
    cfg.validate()
    root = Path(cache_dir).expanduser() if cache_dir is not None else cache_root()
    t_start = time.perf_counter()
    out = Path(out_dir)
    _prepare_out(out)
    fsio.atomic_write(out / MARKER, json.dumps({"lark_jax_demo": 1, "preset": cfg.preset})
                      + "\n")
    mesh = mesh if mesh is not None else make_mesh()
    ctx = stages.DemoContext(cfg, out, mesh, reporter if reporter is not None else _Silent(),
                             cache_dir=cache_dir, rebuild_student=rebuild_student)
    ctx.rep.info(f"lark-jax demo ({cfg.preset}) on {mesh_summary(mesh)} -> {out}")
    with compilation_cache(root / "jax-compilation-cache" if persistent_compilation_cache
                           else None), ctx.rep.bar(None, "demo stages (estimated s)",
                                                   unit="s") as overall:
        stages.make_task(ctx)
        ctx.estimate = _estimate(ctx)
        total = sum(ctx.estimate.values())
        ctx.rep.info(f"estimate: about {total / 60:.0f} min at the speed of a "
                     f"{REFERENCE_MACHINE} (" + ", ".join(
                         f"{k} {v / 60:.1f}" for k, v in ctx.estimate.items()) + " min)")
        overall(0, total=round(total))
        # The bar advances by each stage's estimate: its time left is the estimate scaled
        # by the speed measured so far.
        for name, stage in (("student", stages.make_student), ("score", stages.score),
                            ("base eval", stages.evaluate_base),
                            ("fine-tunes", stages.run_methods),
                            ("diagnostics", stages.diagnostics)):
            stage(ctx)
            overall(round(ctx.estimate[name]))
    with ctx.stage("report"):
        results = report.build_results(ctx, t_start)
        plots = report.plots(ctx, results)
        markdown = report.render_markdown(results)
        fsio.atomic_write(out / "results.json",
                          json.dumps(results, indent=1, ensure_ascii=False) + "\n")
        fsio.atomic_write(out / "results.md", markdown)
    return DemoResult(out, results, markdown, plots, time.perf_counter() - t_start)
