"""A run's dataset: the samples at ``data.path`` and the config completed from them. Above both the
pipelines (which read the samples) and pdiff.latent (what latent shards add to a run, which opens
samples through the pipelines' registry itself)."""
from __future__ import annotations

from dataclasses import replace

from .config import fill_from_data
from .latent import with_data_defaults
from .pipelines import SourceError, open_data


def open_dataset(cfg):
    """Open the samples at ``cfg.data.path`` (through the source registry, pipelines/sources.py;
    shards are checked against their manifest) and complete the config from what they know:
    (cfg with data.resolution, data.channels and network.label_dim filled in, and for latent shards
    what pdiff.latent.with_data_defaults takes; the source; lines saying what was taken). A value the
    user gave that contradicts the data is a ConfigError."""
    source = open_data(cfg.data)
    try:
        cfg, notes = fill_from_data(cfg, source.resolution, source.sample_channels, source.num_classes,
                                    str(cfg.data.path))
        cfg = with_data_defaults(cfg, source)   # latent shards: their patch sizes and autoencoder
        cfg = with_feature_channels(cfg, source)
    except Exception:
        source.close()
        raise
    return cfg, source, notes


def with_feature_channels(cfg, source):
    """repr.loss=align: ``cfg`` with repr.feature_channels taken from the source's stored feature grids
    (a value the user gave must agree); a SourceError when it stores none."""
    if cfg.repr.loss != "align":
        return cfg
    feats = source.features
    if not feats:
        raise SourceError(f"{cfg.data.path}: repr.loss=align needs a frozen encoder's feature grids stored with the "
                          f"samples: shard them with `pdiff shard SRC OUT --encode-features ENCODER` "
                          f"(docs/representation.md), or use repr.loss=dispersive (no encoder)")
    given = cfg.repr.feature_channels
    if given and given != feats["channels"]:
        raise SourceError(f"{cfg.data.path}: repr.feature_channels={given} but the stored grids have "
                          f"{feats['channels']} channels (encoder {feats.get('source')}); remove the setting")
    out = replace(cfg, repr=replace(cfg.repr, feature_channels=int(feats["channels"])))
    out.given = cfg.given
    return out
