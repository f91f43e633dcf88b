"""Progress of a long job, for whoever watches it: a bar on a terminal; elsewhere (SLURM, nohup, a pipe
into a log file) a plain line every so often, since a bar's carriage returns become one endless line
there, or nothing until the end.

    with Progress(total=n, what="shard", unit="img") as progress:
        for ...:
            progress.update(1)

The line interval is ``every_s`` seconds (default ``PDIFF_PROGRESS_SECONDS`` from the environment, else
30); a line is also written at the start and at the end. Needs no torch (the shard writer uses it).
"""
from __future__ import annotations

import os
import sys
import time

DEFAULT_EVERY_S = 30.0


def interval_s() -> float:
    """Seconds between progress lines: ``PDIFF_PROGRESS_SECONDS``, else 30 (the trainer's console
    keeps the same interval)."""
    return float(os.environ.get("PDIFF_PROGRESS_SECONDS", DEFAULT_EVERY_S))


def hms(seconds: float) -> str:
    """0:05:10 (hours go past 24); "--" when there is no estimate."""
    if seconds != seconds or seconds == float("inf"):
        return "--"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    """Counts work done out of ``total`` (None: unknown). ``enabled=False`` shows nothing; ``bar``
    (default: the stream is a terminal) chooses the bar over periodic lines."""

    def __init__(self, total: int | None, what: str, unit: str = "it", initial: int = 0, enabled: bool = True,
                 every_s: float | None = None, bar: bool | None = None, stream=None):
        self.total, self.what, self.unit = total, what, unit
        self.done = self.initial = initial
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.every_s = interval_s() if every_s is None else every_s
        self.t0 = self._last = time.monotonic()
        self._bar = None
        self._closed = False
        if not enabled:
            return
        if bar if bar is not None else _is_tty(self.stream):
            from tqdm import tqdm
            self._bar = tqdm(total=total, initial=initial, unit=unit, desc=what, file=self.stream)
        else:
            self._line()

    def update(self, n: int = 1) -> None:
        self.done += n
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(n)
            return
        now = time.monotonic()
        if now - self._last >= self.every_s:
            self._last = now
            self._line()

    def line(self) -> str:
        """The progress as one line of text: done, share, rate, elapsed time and ETA."""
        elapsed = time.monotonic() - self.t0
        rate = (self.done - self.initial) / elapsed if elapsed > 0 else 0.0
        text = f"{self.what}: {self.done:,}"
        if self.total is not None:
            text += f"/{self.total:,} {self.unit} ({100.0 * self.done / max(self.total, 1):.1f}%)"
        else:
            text += f" {self.unit}"
        text += f", {rate:.1f} {self.unit}/s, {hms(elapsed)} elapsed"
        if self.total is not None and self.done < self.total and rate > 0:
            text += f", ETA {hms((self.total - self.done) / rate)}"
        return text

    def _line(self) -> None:
        print(self.line(), file=self.stream, flush=True)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
        else:
            self._line()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _is_tty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
