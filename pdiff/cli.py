"""`pdiff SUBCOMMAND ...`: each subcommand lives in its own module with a ``main(argv) -> int``."""
from __future__ import annotations

import importlib
import importlib.metadata as md
import os
import signal
import sys

from . import __version__
from .errors import UserError

COMMANDS = {
    "train": ("pdiff.train", "train (or resume) a model: pdiff train --config FILE [key=value ...]"),
    "config": ("pdiff.tools.config", "every config key: type, default and meaning"),
    "info": ("pdiff.tools.info", "parameters, FLOPs per patch size and the schedule's cost per image"),
    "shard": ("pdiff.tools.shard", "write a dataset as WebDataset shards; 'shard verify', 'shard info'"),
    "sample": ("pdiff.tools.sample", "generate images from a snapshot or checkpoint"),
    "fid": ("pdiff.tools.fid", "FID: 'fid ref', 'fid calc', 'fid gen'"),
    "bench": ("pdiff.tools.bench",
              "throughput: 'bench data|step|train|sample|compare'; 'bench quality': patches vs full images"),
    "ema": ("pdiff.tools.ema", "post-hoc EMA (ema.mode=power runs): 'ema reconstruct', 'ema sweep'"),
    "launch": ("pdiff.tools.launch",
               "torchrun's launcher (same options); a failed job ends with one line, no traceback"),
    "demo": ("pdiff.demo", "train a small model on scikit-learn's digits and write a sample grid"),
}


def usage() -> str:
    lines = ["usage: pdiff COMMAND [args...]     (pdiff COMMAND --help for its options; pdiff --version)",
             "", "commands:"]
    lines += [f"  {name:<8}{text}" for name, (_, text) in COMMANDS.items()]
    return "\n".join(lines)


def version() -> str:
    """pdiff's version and what it runs on."""
    parts = []
    for dist in ("torch", "triton", "nvidia-dali-cuda120", "nvidia-dali-cuda130"):
        try:
            parts.append(f"{dist} {md.version(dist)}")
        except md.PackageNotFoundError:
            pass
    return f"pdiff {__version__} ({', '.join(parts) or 'torch not installed'})"


def main(argv: list[str] | None = None) -> int:
    """Run ``pdiff ARGV``; a reader that stops early (``pdiff shard info DIR | head``) ends it quietly."""
    try:
        try:
            return _dispatch(argv)
        finally:
            sys.stdout.flush()      # what is still buffered goes out here, where a closed pipe is caught
    except BrokenPipeError:
        return _reader_gone()


def _reader_gone() -> int:
    """stdout's reader has gone: point stdout (and stderr, if it went with it) at /dev/null, so that
    nothing more fails at exit, and end with the status the shell gives a command SIGPIPE ended."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    try:
        sys.stderr.flush()
    except BrokenPipeError:
        os.dup2(devnull, sys.stderr.fileno())
    os.close(devnull)
    return 128 + signal.SIGPIPE


def _dispatch(argv: list[str] | None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print(usage(), file=sys.stderr)
        return 2
    if argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if argv[0] in ("-V", "--version"):
        print(version())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"pdiff: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    try:
        return int(module.main(rest) or 0)
    except UserError as e:  # the user's data, files or config: the message, not a traceback
        if not e.every_rank or os.environ.get("RANK", "0") == "0":     # once per torchrun job
            print(f"pdiff {name}: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:   # Ctrl-C (training itself stops cleanly on it): no traceback
        print(f"pdiff {name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
