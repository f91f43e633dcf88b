"""What a run takes from latent data: ``with_data_defaults`` fills in the config from the shards (the
paper's latent patch sizes, the autoencoder's record, scale and shift), and ``training_vae`` is
the decoder the trainer's sample grids and FID go through. The autoencoder itself is pdiff/vae.py."""
from __future__ import annotations

import dataclasses
import sys

from pdiff.pipelines import SourceError, open_source

from .config import Config, ConfigError, VAEConfig
from .schedule import latent_patch_sizes
from .vae import VAEError, describe_record, load_run_vae


def with_data_defaults(cfg: Config, source=None) -> Config:
    """``cfg`` with what latent shards at ``data.path`` say filled in (image data, or a path that does
    not open, leave it as it is: the pipeline reports the latter). ``source``: the samples at
    ``data.path`` when the caller has them open already (used as they are, neither opened nor closed):

    * patch.sizes / patch.probs, when both are empty: {R/2, R} with (1 - p, p), the paper's latent setting;
    * vae.scale and vae.shift: the data's (a different value set in the config is an error);
    * for shards from `pdiff shard --encode-vae`: vae.sha256 from their manifest (a config naming
      other weights is an error naming both) and vae.source when the config has none.
    """
    if source is not None:
        space = source.latent
    else:
        if not cfg.data.path:
            return cfg
        try:
            source = open_source(cfg.data.path)
        except SourceError:
            return cfg
        space = source.latent
        source.close()
    if space is None:
        return cfg
    where = f"data.path {cfg.data.path}"
    patch = cfg.patch
    if not patch.sizes and not patch.probs and cfg.data.resolution % 2 == 0:
        sizes, probs = latent_patch_sizes(cfg.data.resolution, patch.real_p)
        patch = dataclasses.replace(patch, sizes=sizes, probs=probs)
    default, vae = VAEConfig(), cfg.vae
    updates = {}
    for key, value in (("scale", space.scale), ("shift", space.shift)):
        given = getattr(vae, key)
        if given != getattr(default, key) and given != value:
            raise ConfigError(f"vae.{key} is {given} but the latents at {where} have {key} {value}; drop vae.{key}")
        updates[key] = value
    record = space.vae or {}
    if record:
        if vae.sha256 and vae.sha256 != record["sha256"]:
            raise ConfigError(f"vae.sha256 names the VAE {describe_record(dataclasses.asdict(vae))}, but the latents "
                              f"at {where} were encoded with {describe_record(record)}; drop vae.sha256 (and "
                              f"vae.source) or use shards encoded with that VAE")
        updates["sha256"] = record["sha256"]
        updates["source"] = vae.source or record["source"]
    return dataclasses.replace(cfg, patch=patch, vae=dataclasses.replace(vae, **updates))


def training_vae(cfg: Config, device, needed: bool = True):
    """The VAE the trainer's sample grids and FID decode with (None for a run without one, or when
    ``needed`` is false). One that cannot be loaded only costs the pictures: the grids then show the
    latents' first channels (in-training FID turns itself off), and this says why."""
    if not cfg.vae.source or not needed:
        return None
    try:
        return load_run_vae(cfg, device=device)
    except VAEError as e:
        print(f"pdiff train: sample grids show latents, not images: {e}", file=sys.stderr, flush=True)
        return None
