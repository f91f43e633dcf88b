"""`pdiff shard verify` and `pdiff shard info`: check a shard folder against its manifest, and say
what it holds."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from pdiff.pipelines.sample_source import SourceError
from pdiff.pipelines.shards.format import load_manifest
from pdiff.pipelines.shards.reader import ShardSet


def verify(root: str | Path) -> tuple[bool, str]:
    """Sizes and checksums against the manifest, the indexes, then a decode of every sample. Returns
    (ok, message) where the message names the first bad shard and sample."""
    try:
        shards = ShardSet(root, checksums=True)
        labels = shards.labels
        for i in range(shards.count):
            sample = shards.decode(i)
            if shards.encoding == "latent" and not np.isfinite(sample).all():
                return False, f"{shards.describe(i)}: {int(np.count_nonzero(~np.isfinite(sample)))} non-finite value(s)"
            if shards.num_classes and not 0 <= labels[i] < shards.num_classes:
                return False, f"{shards.describe(i)}: label {labels[i]} outside 0..{shards.num_classes - 1}"
    except SourceError as e:
        return False, str(e)
    return True, f"{root}: OK, {shards.count} samples in {len(shards.tars)} shards decode and match the manifest"


def info(root: str | Path) -> str:
    m = load_manifest(root)
    sizes = [r["bytes"] for r in m["shards"]]
    counts = [r["count"] for r in m["shards"]]
    classes = m["classes"]
    if m["encoding"] == "latent":
        what = [f"latents     {m['count']} of {m['resolution']}x{m['resolution']}x{m['channels']} (H x W x C)",
                f"stored as   latent {m['dtype']}, scale {m['scale']:g} (already applied by the user; "
                f"input layout {m.get('input_layout', 'nhwc')})"]
    else:
        what = [f"images      {m['count']} at {m['resolution']}x{m['resolution']}, {m['channels']} channel(s)",
                f"stored as   {m['encoding']}" + (f" (quality {m['quality']})" if m.get("quality") else "")
                + f", transform {m['transform']}"]
    lines = [
        f"folder      {root}",
        *what,
        "labels      " + (f"{m['num_classes']} classes: " + ", ".join(classes[:12]) + (" ..." if len(classes) > 12 else "")
                           if m["labeled"] else "none"),
        f"shards      {len(sizes)} ({m['shards'][0]['tar']} .. {m['shards'][-1]['tar']}), "
        f"{min(counts)}..{max(counts)} samples, {min(sizes) / 1e6:.2f}..{max(sizes) / 1e6:.2f} MB, total {m['bytes'] / 1e6:.1f} MB",
        f"skipped     {m['skipped']['count']}" + ("" if not m["skipped"]["count"] else " ("
                                                  + ", ".join(f"{r} {n}" for r, n in m["skipped"]["by_reason"].items()) + ")"),
        f"source      {m['source']}",
        f"written     {m['created']} by {m['tool']} {m['tool_version']}",
        f"command     {' '.join(m['command'])}",
    ]
    return "\n".join(lines)
