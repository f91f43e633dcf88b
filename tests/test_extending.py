"""Extending pdiff: a new component is one new file plus one registration line, and the real
training path picks it up by the name the config gives (docs/ARCHITECTURE.md says where each is
registered). Each test defines its component here, as the newcomer's file would, registers it in
the one place, and runs it through load_config, a short CPU training run on digits and sampling (a
data source: through load_config and both pipeline backends; a patch schedule: through
load_config, the pipeline and a short training run).
"""
from __future__ import annotations

import hashlib
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from pdiff.config import ConfigError, load_config
from pdiff.knobs import knob
from pdiff.networks import NetworkConfig
from pdiff.pipelines import SOURCES, SampleSource, SourceError, build_pipeline, dali_available, register_source
from pdiff.pipelines.order import SamplePlan
from pdiff.schedule import SCHEDULES, PatchSchedule, StochasticSchedule, register_schedule
from test_train import final_state, log_rows, write_config


# ---------------------------------------------------------------------------------------------
# A network: what a newcomer's pdiff/networks/toy.py would hold.

@dataclass
class ToyConfig(NetworkConfig):
    """network.arch=toy: the keys every network has (NetworkConfig) and the toy's own."""
    width: int = knob(16, "hidden channels of the toy")


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


def build_toy(cfg: ToyConfig, resolution: int, channels: int) -> nn.Module:
    return ToyNet(channels, cfg.width)


@pytest.fixture
def toy_network():
    """The registration line: in the package it is `"toy": NetworkSpec(toy.ToyConfig, toy.build_toy),`
    in NETWORKS (pdiff/networks/__init__.py); from outside the package, register_network."""
    from pdiff.networks import NETWORKS, register_network
    register_network("toy", build_toy, ToyConfig)
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
    cfg = load_config(path, ["network.width=16", "network.arch=toy", "train.deterministic=false"])
    assert cfg.network.arch == "toy" and isinstance(cfg.network, ToyConfig) and cfg.network.width == 16
    # The config takes the toy's keys (the U-Net keys under it went with the arch change), not another arch's.
    with pytest.raises(ConfigError, match=r"network.model_channels: not a key of network.arch=toy .*"
                                          r"network.arch=ddpmpp \| ncsnpp \| adm \| edm2"):
        load_config(path, ["network.arch=toy", "network.model_channels=16"])
    from pdiff.config import reference
    assert "[toy] hidden channels of the toy" in reference(keys=["network.width"])
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


# ---------------------------------------------------------------------------------------------
# A data source. The newcomer's file: a folder holding images.npy (N, R, R, C) uint8, labels.npy and a
# manifest.json naming the format and the encoding read(i) hands out (png is made on the fly here,
# as a store that keeps encoded images would hand them out).

BACKENDS = ["torch", pytest.param("dali", marks=pytest.mark.skipif(not dali_available(),
                                                                    reason="NVIDIA DALI is not installed"))]


class NpyFolder(SampleSource):
    def __init__(self, root: Path, verify_checksums: bool = False):
        meta = json.loads((root / "manifest.json").read_text())
        self.images = np.load(root / "images.npy", mmap_mode="r")
        self._labels = np.load(root / "labels.npy").astype(np.int64)
        self.count, self.resolution, _, self.channels = self.images.shape
        self.encoding = meta["encoding"]
        self.num_classes = int(self._labels.max()) + 1

    @property
    def labels(self) -> np.ndarray:
        return self._labels

    def fingerprint(self) -> str:
        return hashlib.sha256(np.ascontiguousarray(self.images).tobytes()).hexdigest()[:16]

    def read(self, i: int) -> bytes:
        image = np.ascontiguousarray(self.images[i])
        if self.encoding == "raw":
            return image.tobytes()
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="PNG")
        return buf.getvalue()


@pytest.fixture
def forget_toy_source():
    yield
    SOURCES.pop("toy-npy", None)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("encoding", ["raw", "png"])
def test_add_a_data_source(tmp_path, forget_toy_source, backend, encoding):
    rng = np.random.default_rng()
    r, n, seed = 16, int(rng.integers(9, 20)), int(rng.integers(1 << 30))
    images = rng.integers(0, 256, (n, r, r, 3), dtype=np.uint8)
    labels = rng.integers(0, 4, n)
    root = tmp_path / "toy"
    root.mkdir()
    np.save(root / "images.npy", images)
    np.save(root / "labels.npy", labels)
    (root / "manifest.json").write_text(json.dumps({"format": "toy-npy", "encoding": encoding}))
    cfg = load_config(None, [f"data.path={root}", f"data.resolution={r}", "data.channels=3",
                             f"data.backend={backend}", f"data.workers={1 if encoding == 'png' else 0}",
                             "train.batch=4", f"train.seed={seed}"])
    schedule = StochasticSchedule(r, 4, sizes=[4, 8, 16], probs=[0.4, 0.3, 0.3], seed=seed)
    with pytest.raises(SourceError, match="toy-npy.*pipelines/sources.py"):      # not registered yet
        build_pipeline(cfg, schedule)

    # The registration line: in the package it is `"toy-npy": NpyFolder,` in SOURCES
    # (pipelines/sources.py); from outside the package, register_source.
    register_source("toy-npy", NpyFolder)
    with pytest.raises(ValueError, match="'toy-npy' is already registered"):
        register_source("toy-npy", NpyFolder)
    pipe = build_pipeline(cfg, schedule)
    assert pipe.backend == backend and isinstance(pipe.source, NpyFolder)
    plan = SamplePlan(n, labels, schedule, seed, 0, 1)
    sizes, steps = set(), 0
    while steps < 6 or len(sizes) < 2:             # several steps, at least two patch sizes
        batch, steps = next(pipe), steps + 1
        step = plan.step(batch.images_seen)
        s = batch.patch_size
        sizes.add(s)
        assert batch.patches.shape == (schedule.batch_for(s), s, s, 3)        # uint8 HWC, as decoded
        np.testing.assert_array_equal(batch.labels.numpy(), labels[step.indices])
        for j, (x0, y0) in enumerate(batch.offsets.tolist()):
            assert torch.equal(batch.patches[j], torch.from_numpy(images[step.indices[j], y0:y0 + s, x0:x0 + s]))
    assert pipe.state_dict()["dataset"] == pipe.source.fingerprint()
    pipe.close()


# ---------------------------------------------------------------------------------------------
# A patch schedule: what a newcomer's pdiff/schedule/alternating.py would hold.

TINY = ["network.model_channels=8", "network.channel_mult=[1,2]", "network.num_blocks=1",
        "network.attn_resolutions=[8]", "data.resolution=16", "train.batch=4", "data.backend=torch",
        "data.workers=0", "sample.steps=2", "train.compile=false"]


class AlternatingSchedule(PatchSchedule):
    """Half-size patches and full images in turn: a step of R/2 (2 * batch patches), then one of R
    (batch images), and again. A pure function of images seen: they repeat every 3 * batch."""
    mode = "alternate"

    def sizes_and_probs(self, resolution, real_p, sizes, probs):
        return [resolution // 2, resolution], [0.5, 0.5]      # half the steps each

    def size_at(self, images_seen: int) -> int:
        half = self.resolution // 2
        return half if images_seen % (3 * self.batch) < self.batch_for(half) else self.resolution


@pytest.fixture
def forget_toy_schedule():
    yield
    SCHEDULES.pop(AlternatingSchedule.mode, None)


def test_add_a_patch_schedule(random_shards, tmp_path, one_thread, forget_toy_schedule):
    with pytest.raises(ConfigError, match="patch.mode.*pdiff/schedule/__init__.py"):
        load_config("tiny", TINY + ["patch.mode=alternate"])          # not registered yet
    # The registration line: in the package, AlternatingSchedule in the tuple SCHEDULES is built
    # from (pdiff/schedule/__init__.py); from outside the package, register_schedule.
    register_schedule(AlternatingSchedule)
    with pytest.raises(ValueError, match="'alternate' is already registered"):
        register_schedule(AlternatingSchedule)
    cfg = load_config("tiny", TINY + [f"data.path={random_shards}", "patch.mode=alternate",
                                      f"train.run_dir={tmp_path / 'run'}", "train.duration_images=48",
                                      "train.log_every_images=12", "train.ckpt_every_images=48"])
    schedule = PatchSchedule.from_config(cfg)
    assert isinstance(schedule, AlternatingSchedule) and schedule.sizes == [8, 16]
    # The EMA counts a step as the average step: (2 * 4 + 4) / 2 images.
    assert schedule.ema_images_per_step() == 6.0

    # The data pipeline follows it: sizes in turn, each step's patch count and images seen.
    pipe = build_pipeline(cfg, schedule, 0, 1)
    try:
        got = [next(pipe) for _ in range(4)]
    finally:
        pipe.close()
    assert [b.patch_size for b in got] == [8, 16, 8, 16]
    assert [b.images_seen for b in got] == [0, 8, 12, 20]
    assert [tuple(b.patches.shape) for b in got] == [(8, 8, 8, 3), (4, 16, 16, 3)] * 2

    # The trainer runs it end to end: both sizes trained, every image counted, a checkpoint at the end.
    from pdiff.train import train
    assert train(cfg, "cpu") == 0
    rows = log_rows(tmp_path / "run")
    assert [r["images_seen"] for r in rows] == [12, 24, 36, 48]
    assert all(np.isfinite(r["loss_patch/8"]) and np.isfinite(r["loss_patch/16"]) for r in rows)
    state = final_state(tmp_path / "run")
    assert state["images_seen"] == 48 and state["config"]["patch"]["mode"] == "alternate"
