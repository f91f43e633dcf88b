"""pdiff.progress: the periodic progress lines a job writes where no terminal shows a bar."""
from __future__ import annotations

import io
import re

import numpy as np

from pdiff.progress import Progress


class FakeTTY(io.StringIO):
    def isatty(self):
        return True


def test_lines_every_interval_with_rate_and_eta():
    total = int(np.random.default_rng().integers(5, 50))
    out = io.StringIO()                                   # not a terminal: lines
    with Progress(total, "verify", "samples", every_s=0, stream=out) as p:
        for _ in range(total):
            p.update(1)
    lines = out.getvalue().splitlines()
    assert len(lines) == 1 + total + 1                    # the start, every update (interval 0), the end
    assert lines[0].startswith(f"verify: 0/{total:,} samples (0.0%)")
    assert re.fullmatch(rf"verify: 1/{total:,} samples \(\d+\.\d%\), [\d.]+ samples/s, 0:00:0\d elapsed, ETA "
                        r"\d+:\d\d:\d\d",
                        lines[1]), lines[1]
    assert lines[-1].startswith(f"verify: {total:,}/{total:,} samples (100.0%)") and "ETA" not in lines[-1]


def test_long_interval_prints_start_and_end_only_and_off_prints_nothing():
    out = io.StringIO()
    p = Progress(None, "sample", "img", every_s=3600, stream=out)
    for _ in range(10):
        p.update(3)
    p.close()
    p.close()                                             # closing twice writes nothing more
    assert out.getvalue().splitlines()[0].startswith("sample: 0 img") and len(out.getvalue().splitlines()) == 2
    assert out.getvalue().splitlines()[1].startswith("sample: 30 img, ")
    quiet = io.StringIO()
    with Progress(10, "x", enabled=False, stream=quiet) as p:
        p.update(10)
    assert quiet.getvalue() == "" and p.done == 10


def test_a_terminal_gets_the_bar_and_the_environment_sets_the_interval(monkeypatch):
    tty = FakeTTY()
    with Progress(4, "shard", "img", stream=tty) as p:
        p.update(4)
    assert "\r" in tty.getvalue() and "4/4" in tty.getvalue()     # tqdm's bar, not lines
    monkeypatch.setenv("PDIFF_PROGRESS_SECONDS", "7.5")
    assert Progress(1, "x", stream=io.StringIO()).every_s == 7.5
