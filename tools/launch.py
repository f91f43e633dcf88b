"""`pdiff launch [torchrun options] -m pdiff.cli train ...`: torchrun, with a failed job told in one line.

It takes torchrun's options and runs torchrun's own launcher (the elastic agent: rendezvous,
--max-restarts, --nnodes MIN:MAX). What differs is the end of a failed job: torchrun raises its
ChildFailedError whenever a worker exits non-zero and Python prints it with a traceback, also when
the worker only reported a mistake in the config or the data (its message is printed once, by rank 0,
above). pdiff launch prints one line naming the first rank that failed and exits with that rank's
code (2 for a config error, 1 for other user errors and crashes, 128 + N for a worker killed by
signal N). docs/multinode.md has the launch lines.
"""
from __future__ import annotations

import argparse
import sys

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import get_args_parser, run


def exit_code(worker_code: int) -> int:
    """The launcher's exit status for a failed worker's: its own, or 128 + N when signal N killed it."""
    return 128 - worker_code if worker_code < 0 else worker_code or 1


def main(argv: list[str]) -> int:
    ap = get_args_parser()       # torchrun's own options
    ap.prog, ap.description = "pdiff launch", __doc__
    ap.formatter_class = argparse.RawDescriptionHelpFormatter
    args = ap.parse_args(argv)
    try:
        run(args)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        code = failure.exitcode
        how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
        print(f"pdiff launch: the job failed: rank {rank} (pid {failure.pid}) {how}; "
              f"its message is above", file=sys.stderr, flush=True)
        return exit_code(code)
    return 0
