"""The one place that decides what the CLI shows while it works.

Progress bars go to stderr, only when it is a TTY and ``--quiet`` is off;
the final one-line summary always goes to stdout. Library code never prints:
it accepts an optional ``progress(n)`` callback that the CLI builds here.
"""

from __future__ import annotations

import contextlib
import sys

from tqdm import tqdm


class Reporter:
    def __init__(self, quiet: bool = False, verbose: bool = False):
        self.quiet = quiet
        self.verbose = verbose and not quiet

    @property
    def bars_enabled(self) -> bool:
        return not self.quiet and sys.stderr.isatty()

    @contextlib.contextmanager
    def bar(self, total: int | None, desc: str, unit: str = "it"):
        """Yields a callback ``advance(n, total=None, **postfix)``; a no-op when bars are off."""
        if not self.bars_enabled:
            yield lambda n=1, total=None, **postfix: None
            return
        with tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True,
                  smoothing=0.1) as t:
            def advance(n=1, total=None, **postfix):
                if total is not None and t.total != total:
                    t.total = total  # learnt only once the work starts (e.g. steps)
                if postfix:
                    t.set_postfix(postfix, refresh=False)
                t.update(n)
            yield advance

    def info(self, msg: str) -> None:
        """Progress notes on stderr (shown unless --quiet)."""
        if not self.quiet:
            print(msg, file=sys.stderr, flush=True)

    def debug(self, msg: str) -> None:
        if self.verbose:
            print(msg, file=sys.stderr, flush=True)

    def summary(self, msg: str, stderr: bool = False) -> None:
        """The final one-line result, always shown: on stdout, or on stderr for commands
        whose stdout is data (``generate``, ``eval --aggregate``)."""
        print(msg, file=sys.stderr if stderr else sys.stdout, flush=True)
