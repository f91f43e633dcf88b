"""Extending pdiff: a new component is one new file plus one registration line, and the real
training path picks it up by the name the config gives (docs/ARCHITECTURE.md says where each is
registered). Each test defines its component here, as the newcomer's file would, registers it in
the one place, and runs it through load_config, a short CPU training run on digits and sampling.
"""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pdiff.config import load_config
from test_train import digits_shards, final_state, log_rows, write_config  # noqa: F401  (digits_shards: a fixture)


# ---------------------------------------------------------------------------------------------
# A network: what a newcomer's pdiff/networks/toy.py would hold.

class ToyNet(nn.Module):
    """Two 3x3 convolutions over the image and coordinate channels, the hidden features scaled by
    the noise level: the contract every network keeps (C + 2 channels in, C out, ``downsample``)."""

    def __init__(self, channels: int, width: int):
        super().__init__()
        self.downsample = 1                       # any patch size works
        self.conv_in = nn.Conv2d(channels + 2, width, 3, padding=1)
        self.noise_scale = nn.Linear(1, width)
        self.conv_out = nn.Conv2d(width, channels, 3, padding=1)

    def forward(self, x, noise_labels, class_labels=None):
        h = self.conv_in(x) * (1 + self.noise_scale(noise_labels[:, None].to(x.dtype)))[:, :, None, None]
        return self.conv_out(F.silu(h))


def build_toy(cfg, resolution: int, channels: int) -> nn.Module:
    return ToyNet(channels, cfg.model_channels)


@pytest.fixture
def toy_network():
    """The registration line: in the package it is `"toy": toy.build_toy,` in NETWORKS
    (pdiff/networks/__init__.py); from outside the package, register_network."""
    from pdiff.networks import NETWORKS, register_network
    register_network("toy", build_toy)
    yield
    NETWORKS.pop("toy")


def test_add_a_network(tmp_path, digits_shards, toy_network):  # noqa: F811  (digits_shards: the fixture)
    from pdiff.generate import SampleOptions, generate
    from pdiff.networks import register_network
    from pdiff.snapshot import load_snapshot
    from pdiff.train import train

    with pytest.raises(ValueError, match="'toy' is already registered"):
        register_network("toy", build_toy)
    # Chosen by name through the config loader (which checks names against the registry). In
    # process, so no global deterministic mode is switched on for the tests that follow.
    path = write_config(tmp_path, digits_shards, train={"duration_images": 192, "ckpt_every_images": 192})
    cfg = load_config(path, ["network.arch=toy", "network.model_channels=16", "train.deterministic=false"])
    assert cfg.network.arch == "toy"
    assert train(cfg, "cpu") == 0

    run = Path(cfg.train.run_dir)
    rows = log_rows(run)
    assert rows[-1]["images_seen"] >= 192 and all(math.isfinite(r["loss"]) for r in rows)
    assert load_config(run / "config.yaml").network.arch == "toy"
    # Trained: the final weights are the toy's and differ from a fresh toy's initialisation.
    torch.manual_seed(cfg.train.seed)
    initial = build_toy(cfg.network, cfg.data.resolution, cfg.data.channels).state_dict()
    trained = {k.removeprefix("net."): v for k, v in final_state(run)["model"].items()}
    assert trained.keys() == initial.keys()
    assert any(not torch.equal(trained[k], initial[k]) for k in initial)
    # Sampled: the end-of-run grid, and seeds drawn from the EMA snapshot rebuilt by name.
    assert list((run / "samples").glob("samples-*.png"))
    model, snap_cfg, _ = load_snapshot(sorted((run / "snapshots").glob("ema-*.safetensors"))[-1])
    assert isinstance(model.net, ToyNet) and snap_cfg.network.arch == "toy"
    images, _ = generate(model, [0, 1, 2], cfg.data.resolution, cfg.data.channels, cfg.network.label_dim,
                         SampleOptions(sampler=cfg.sample))
    assert images.shape == (3, cfg.data.channels, cfg.data.resolution, cfg.data.resolution)
    assert torch.isfinite(images).all()
