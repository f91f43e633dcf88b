"""A feature space for comparing generated images with the user's data when no Inception weights
are at hand: a small network trained on that data for the purpose, a classifier where the data has
labels, else a denoising autoencoder, and the Frechet distance (FID's formula) of its features.

The numbers rank models of one dataset against each other (the same network, data and image count
for all) and are not comparable with FID or with another dataset's: every report says which
network made them.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from pdiff.pipelines.sources import open_source

FEATURES = 64


class FeatureNet(nn.Module):
    """Conv encoder R -> R/4 (32, 64, 64 channels), flattened to ``FEATURES`` features; a classifier
    head (labels) or a decoder back to the image (denoising autoencoder) trains it."""

    def __init__(self, resolution: int, channels: int, num_classes: int):
        super().__init__()
        if resolution % 4:
            raise ValueError(f"the feature network needs a resolution divisible by 4, got {resolution}")
        q = resolution // 4
        self.resolution, self.channels, self.num_classes = resolution, channels, num_classes
        self.encoder = nn.Sequential(
            nn.Conv2d(channels, 32, 3, padding=1), nn.SiLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(64, 64, 3, stride=2, padding=1), nn.SiLU(),
            nn.Flatten(), nn.Linear(64 * q * q, FEATURES))
        if num_classes > 0:
            self.head = nn.Sequential(nn.SiLU(), nn.Linear(FEATURES, num_classes))
        else:
            self.head = nn.Sequential(
                nn.SiLU(), nn.Linear(FEATURES, 64 * q * q), nn.Unflatten(1, (64, q, q)),
                nn.Upsample(scale_factor=2), nn.Conv2d(64, 32, 3, padding=1), nn.SiLU(),
                nn.Upsample(scale_factor=2), nn.Conv2d(32, channels, 3, padding=1))

    @property
    def kind(self) -> str:
        return "classifier" if self.num_classes > 0 else "denoising autoencoder"

    def features(self, images_uint8: torch.Tensor) -> torch.Tensor:
        """(B, FEATURES) float64 features of uint8 NCHW images."""
        x = images_uint8.to(next(self.parameters()).device, torch.float32) / 127.5 - 1
        return self.encoder(x).double()


def to_nchw(images_nhwc: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images_nhwc)).permute(0, 3, 1, 2)


def train_feature_net(images: np.ndarray, labels: np.ndarray | None, steps: int = 1500, batch: int = 64,
                      seed: int = 0, lr: float = 2e-3) -> FeatureNet:
    """Train a FeatureNet on uint8 NHWC ``images``: cross-entropy on ``labels`` (int, -1 = none)
    when every image has one, else denoising (noise of std 0.1 to 0.5 on [-1, 1] images)."""
    n, r, _, c = images.shape
    has_labels = labels is not None and len(labels) == n and (labels >= 0).all()
    classes = int(labels.max()) + 1 if has_labels else 0
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = FeatureNet(r, c, classes)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    x_all = to_nchw(images)
    y_all = torch.from_numpy(labels.astype(np.int64)) if has_labels else None
    net.train()
    for step in range(steps):
        idx = torch.randint(0, n, (min(batch, n),), generator=g)
        x = x_all[idx].float() / 127.5 - 1
        for group in opt.param_groups:       # cosine decay: a stable end point in few steps
            group["lr"] = lr * 0.5 * (1 + np.cos(np.pi * step / steps))
        if has_labels:
            loss = nn.functional.cross_entropy(net.head(net.encoder(x)), y_all[idx])
        else:
            noisy = x + torch.randn(x.shape, generator=g) * (0.1 + 0.4 * torch.rand(len(x), 1, 1, 1, generator=g))
            loss = (net.head(net.encoder(noisy)) - x).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return net.eval().requires_grad_(False)


@torch.no_grad()
def feature_stats(net: FeatureNet, images_nchw_uint8: torch.Tensor, batch: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of the features of uint8 NCHW images."""
    f = torch.cat([net.features(part) for part in images_nchw_uint8.split(batch)]).cpu().numpy()
    return f.mean(0), np.cov(f, rowvar=False)


@dataclass
class DataFeatures:
    """The trained network and the statistics of the data in its features."""
    net: FeatureNet
    mu: np.ndarray
    sigma: np.ndarray
    count: int
    description: str


def load_images(path, max_images: int = 20000) -> tuple[np.ndarray, np.ndarray | None]:
    """uint8 NHWC images and int labels (or None) of a dataset pdiff reads (data.path), at most
    ``max_images`` spread evenly over it."""
    source = open_source(path)
    if source.encoding == "latent":
        raise ValueError(f"{path} holds latents: the quality benchmark's feature network needs images "
                         f"(give --inception and --fid-ref for decoded samples instead)")
    idx = np.linspace(0, source.count - 1, min(source.count, max_images)).round().astype(np.int64)
    images = np.stack([source.decode(int(i)) for i in idx])
    labels = np.asarray(source.labels)[idx] if source.num_classes > 0 else None
    source.close()
    return images, labels


def data_features(path, steps: int = 1500, max_images: int = 20000, seed: int = 0) -> DataFeatures:
    """Train the feature network on the dataset at ``path`` and take its statistics there."""
    images, labels = load_images(path, max_images)
    net = train_feature_net(images, labels, steps=steps, seed=seed)
    mu, sigma = feature_stats(net, to_nchw(images))
    n, r, _, c = images.shape
    what = (f"a {net.kind} ({FEATURES} features; {sum(p.numel() for p in net.parameters()):,} parameters) trained "
            f"for {steps} steps on {n} images of {path}" + (f" with their {net.num_classes} labels"
                                                            if net.num_classes else ""))
    return DataFeatures(net, mu, sigma, n, what)
