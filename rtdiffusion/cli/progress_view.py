"""The build's stages on the terminal (run, bench, td, demo): a listener of rtdiffusion.progress.BuildProgress.

On a terminal (a TTY) one line is rewritten in place: ``build [3/6] first frame [#####.....] 48%  12.0 s,
about 13 s left (recorded)``, ending with a newline when the build is done. Otherwise (a log file, a pipe,
a test) each stage gives one line when it starts and one when it finishes, with the elapsed time and the
estimate of what is left, and the source of that estimate (recorded: the last build with the same key;
prior: a fixed guess per stage kind and device).
"""

from __future__ import annotations

import sys
import threading
from typing import TextIO

from ..progress import BuildProgress, StageEvent, StageState

BAR = 20


def _secs(s: float) -> str:
    return f"{s:.1f} s" if s < 120 else f"{s / 60:.1f} min"


def describe(e: StageEvent) -> str:
    """One line for an event (no newline)."""
    head = f"build [{e.index}/{e.count}] {e.stage}"
    left = f"about {_secs(e.estimate_s)} left ({e.source.value} estimate)"
    if e.state is StageState.START:
        return f"{head}: started; {e.fraction:.0%} done, {_secs(e.elapsed_s)} so far, {left}"
    if e.state is StageState.FINISH:
        note = f" ({e.note})" if e.note else ""
        return f"{head}: took {_secs(e.stage_s)}{note}; {e.fraction:.0%} done, {_secs(e.elapsed_s)} so far, {left}"
    if e.state is StageState.SKIP:
        return f"{head}: skipped"
    return f"build done in {_secs(e.elapsed_s)} ({e.count} stages)"


class TerminalProgress:
    """Writes events to ``stream`` (default stderr): a bar line on a TTY, else one line per event."""

    def __init__(self, stream: TextIO | None = None, tty: bool | None = None) -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self._lock = threading.Lock()
        self.bar = None  # a tqdm bar on screen (show_with): lines go through it, or its description shows the stage

    def __call__(self, e: StageEvent) -> None:
        with self._lock:
            if self.bar is not None:
                if not self.tty:
                    self.bar.write(describe(e), file=self.stream)
                elif e.state is StageState.START:
                    self.bar.set_description(f"build [{e.index}/{e.count}] {e.stage}")
            elif self.tty:
                self._bar(e)
            else:
                self.stream.write(describe(e) + "\n")
            self.stream.flush()

    def _bar(self, e: StageEvent) -> None:
        if e.state is StageState.SKIP:
            return
        if e.state is StageState.DONE:
            self.stream.write("\r\x1b[K" + describe(e) + "\n")
            return
        filled = int(round(e.fraction * BAR))
        bar = "#" * filled + "." * (BAR - filled)
        self.stream.write(f"\r\x1b[Kbuild [{e.index}/{e.count}] {e.stage} [{bar}] {e.fraction:.0%}  "
                          f"{_secs(e.elapsed_s)}, about {_secs(e.estimate_s)} left ({e.source.value})")


def show_with(progress: BuildProgress | None, bar) -> None:
    """The rest of ``progress``'s stages (the first frame) go through ``bar``, a tqdm bar now on screen: as
    lines printed above it, or on a terminal as its description."""
    for fn in progress.listeners if progress is not None else ():
        if isinstance(fn, TerminalProgress):
            fn.bar = bar
