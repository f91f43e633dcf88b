"""The one kind of error the command line reports without a traceback.

A ``UserError`` is a problem with the user's data, files or config (a damaged shard, a checkpoint
that does not verify, an unknown config key, a run folder another trainer holds): its message says
what is wrong, where, and what to do, and ``pdiff.cli`` prints just that and exits with
``exit_code``. Every other exception is a bug and keeps its traceback. Error classes elsewhere
derive from it (``ConfigError``, ``SourceError``/``ShardError``, ``SnapshotError``,
``CheckpointError``, ...), so raising one is all a module does.
"""
from __future__ import annotations


class UserError(Exception):
    """A mistake in the user's data, files or config: reported as its message alone.

    ``every_rank``: under torchrun every rank meets this error the same way (the config, a resume
    check, the run lock, all decided alike or broadcast by rank 0), so rank 0 alone prints it; an
    error one rank meets on its own (a damaged sample it read) is printed by that rank."""
    exit_code = 1
    every_rank = False
