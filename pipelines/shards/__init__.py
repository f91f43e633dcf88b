"""The shard format in one place: `pdiff shard` writes a dataset as WebDataset tar shards with DALI
indexes and a manifest; the pipelines read them back by sample index.

    format.py      what is on disk: member extensions, index files, manifest fields, checks
    reader.py      ShardSet: random access by global index (the pipelines' registered source)
    options.py     the writer's options (checked before anything is read) and its seeded write order
    inputs.py      the writer's inputs: image folders, zips, .npz/.npy arrays (images or latents)
    preprocess.py  one sample: load, check, transform to R x R, encode (in worker processes)
    encode_vae.py  --encode-vae: images -> an autoencoder's posterior, in batches (main process)
    write.py       write_shards: shards, journal and resume, manifest
    verify.py      verify and info

Nothing here imports torch but encode_vae.py (imported for --encode-vae only): the writer and its
worker processes need numpy and Pillow only.
"""
from pdiff.pipelines.shards.format import FORMAT, MANIFEST, ShardError, load_manifest, read_index
from pdiff.pipelines.shards.inputs import ShardInputError
from pdiff.pipelines.shards.preprocess import TRANSFORMS
from pdiff.pipelines.shards.options import LAYOUTS, Options
from pdiff.pipelines.shards.reader import ShardSet
from pdiff.pipelines.shards.verify import info, verify
from pdiff.pipelines.shards.write import write_shards

__all__ = ["FORMAT", "MANIFEST", "LAYOUTS", "TRANSFORMS", "Options", "ShardError", "ShardInputError", "ShardSet",
           "info", "load_manifest", "read_index", "verify", "write_shards"]
