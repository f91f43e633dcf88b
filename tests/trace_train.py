"""`pdiff` with the sample ids of every step recorded, for the elastic-resume tests: run it as
`python tests/trace_train.py train ...` (or as torchrun's script). Each rank appends one JSON line per
step it reads, {"images_seen", "rank", "world", "indices"}, to $PDIFF_TRACE/trace-<pid>.jsonl (a
restarted process writes a new file)."""
import json
import os
import sys

from pdiff.pipelines.torch_loader import TorchPatchPipeline

from pdiff.cli import main

_next_step = TorchPatchPipeline._next_step


def traced_next_step(self):
    step, patches, replaced = _next_step(self)
    row = {"images_seen": int(step.images_seen), "rank": self.rank, "world": self.world_size,
           "indices": [int(i) for i in step.indices]}
    with open(os.path.join(os.environ["PDIFF_TRACE"], f"trace-{os.getpid()}.jsonl"), "a") as f:
        f.write(json.dumps(row) + "\n")
    return step, patches, replaced


TorchPatchPipeline._next_step = traced_next_step

if __name__ == "__main__":
    sys.exit(main())
