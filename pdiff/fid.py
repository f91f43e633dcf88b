"""Fréchet Inception Distance with the TF-FID Inception-v3 (Heusel et al. 2017).

The network is the one every published diffusion FID is measured with (TF's 2015-12-05 Inception,
as ported by pytorch-fid and used by EDM and torch-fidelity): its ``state_dict`` keys match
pytorch-fid's released ``pt_inception-2015-12-05-6726825d.pth``, so that file loads as is. The
features are the 2048-d output of the last average pool, on inputs resized to 299 x 299 bilinearly
and scaled to [-1, 1].

    net = load_inception("~/weights/pt_inception-2015-12-05-6726825d.pth")
    stats = FeatureStats(); stats.update(inception_features(net, images_uint8_nchw))
    fid = frechet_distance(*stats.mean_cov(), *load_stats("celeba64.npz").mean_cov())
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import distributed
from .errors import UserError
from .generate import SampleOptions, iter_uint8

FID_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   "pt_inception-2015-12-05-6726825d.pth")
FEATURE_DIM = 2048
STATS_FORMAT = "pdiff-fid-stats-1"


class InceptionWeightsMissing(UserError, FileNotFoundError):
    exit_code = 2


class FIDError(UserError, ValueError):
    exit_code = 2


# --------------------------------------------------------------------------------------------
# The network. Layer names follow torchvision's Inception-v3, which is what the weights file uses.

class BasicConv2d(nn.Module):
    def __init__(self, cin: int, cout: int, kernel, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _tf_avg_pool(x):
    # TF's 3x3 average pool leaves the zero padding out of the mean.
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class FIDInceptionA(nn.Module):
    def __init__(self, cin: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, 1)
        self.branch5x5_1 = BasicConv2d(cin, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, 1)

    def forward(self, x):
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(_tf_avg_pool(x))], 1)


class InceptionB(nn.Module):
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class FIDInceptionC(nn.Module):
    def __init__(self, cin: int, c7: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 192, 1)
        self.branch7x7_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3,
                      self.branch7x7dbl_4, self.branch7x7dbl_5):
            d = layer(d)
        return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(_tf_avg_pool(x))], 1)


class InceptionD(nn.Module):
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class FIDInceptionE(nn.Module):
    """``max_pool``: the last block of the TF graph pools its pool branch with a max, not a mean."""

    def __init__(self, cin: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(cin, 320, 1)
        self.branch3x3_1 = BasicConv2d(cin, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        d = torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], 1)
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _tf_avg_pool(x)
        return torch.cat([self.branch1x1(x), b3, d, self.branch_pool(pooled)], 1)


class FIDInceptionV3(nn.Module):
    """Images (B, 3, H, W) in [0, 1] -> 2048-d pool features (B, 2048).

    ``fc`` (1008 classes) is kept only so the weights file loads strictly; features skip it."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = FIDInceptionA(192, 32)
        self.Mixed_5c = FIDInceptionA(256, 64)
        self.Mixed_5d = FIDInceptionA(288, 64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = FIDInceptionC(768, 128)
        self.Mixed_6c = FIDInceptionC(768, 160)
        self.Mixed_6d = FIDInceptionC(768, 160)
        self.Mixed_6e = FIDInceptionC(768, 192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = FIDInceptionE(1280, max_pool=False)
        self.Mixed_7c = FIDInceptionE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(images, size=(299, 299), mode="bilinear", align_corners=False)
        x = 2 * x - 1
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        for name in ("Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c",
                     "Mixed_6d", "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c"):
            x = getattr(self, name)(x)
        return x.mean(dim=(2, 3))


# --------------------------------------------------------------------------------------------
# Weights

FID_WEIGHTS_FILE = FID_WEIGHTS_URL.rsplit("/", 1)[1]


def cache_dir() -> Path:
    """Where downloaded weights are kept: $PDIFF_CACHE, else ~/.cache/pdiff."""
    return Path(os.environ.get("PDIFF_CACHE") or Path.home() / ".cache" / "pdiff")


def missing_weights_message(detail: str = "") -> str:
    head = f"{detail}\n" if detail else ""
    cached = cache_dir() / FID_WEIGHTS_FILE
    return (f"{head}FID needs the TF-FID Inception-v3 weights (pytorch-fid's {FID_WEIGHTS_FILE}, 91 MB). "
            f"Download them where there is internet access:\n"
            f"    curl -L -o {FID_WEIGHTS_FILE} {FID_WEIGHTS_URL}\n"
            f"and put the file at {cached} (the cache, used from then on; set PDIFF_CACHE to keep it "
            f"elsewhere), or pass --inception PATH_TO_FILE.")


def _fetch(url: str, dest: Path) -> None:
    """Download ``url`` to ``dest`` (a temporary name the caller renames)."""
    with urllib.request.urlopen(url, timeout=60) as r, open(dest, "wb") as f:
        while chunk := r.read(1 << 20):
            f.write(chunk)


def _download_once(url: str, path: Path, download: bool = True) -> Path:
    """``path`` if it is cached, else ``url`` downloaded there (atomically) first."""
    if path.is_file():
        return path
    if not download:
        raise InceptionWeightsMissing(missing_weights_message(f"{path} is not cached yet."))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.part{os.getpid()}")
    try:
        _fetch(url, tmp)
        os.replace(tmp, path)
    except OSError as e:
        raise InceptionWeightsMissing(missing_weights_message(
            f"{path} is not cached yet and downloading {url} failed ({e}).")) from None
    finally:
        tmp.unlink(missing_ok=True)
    return path


def resolve_weights(source: str | os.PathLike | None = None, download: bool = True) -> Path:
    """The Inception weights file: ``source`` (a file, or a URL downloaded once into the cache
    folder), or when none is given the standard file, from the cache or downloaded into it once
    (``download=False``: from the cache only)."""
    if source is None or str(source) == "":
        return _download_once(FID_WEIGHTS_URL, cache_dir() / FID_WEIGHTS_FILE, download)
    text = str(source)
    if text.startswith(("http://", "https://", "file://")):
        name = text.rstrip("/").rsplit("/", 1)[-1] or hashlib.sha1(text.encode()).hexdigest()
        return _download_once(text, cache_dir() / name, download)
    path = Path(text).expanduser()
    if not path.is_file():
        raise InceptionWeightsMissing(missing_weights_message(f"Inception weights file {path} does not exist."))
    return path


def load_inception(source: str | os.PathLike | None = None, device="cpu", random_init: bool = False,
                   seed: int = 0) -> FIDInceptionV3:
    """The FID network in eval mode. ``random_init`` builds it with random weights (tests only:
    its features are not comparable with anything)."""
    if random_init:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = FIDInceptionV3()
            for m in net.modules():  # He init keeps activations O(1) through the 94 conv layers
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
        return net.eval().requires_grad_(False).to(device)
    path = resolve_weights(source)
    net = FIDInceptionV3()
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated download or an unrelated file
        raise FIDError(f"{path}: cannot read it as a PyTorch state_dict ({e}). "
                       + missing_weights_message()) from None
    if not isinstance(state, dict):
        raise FIDError(f"{path}: expected a state_dict, found {type(state).__name__}")
    result = net.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
    if missing or result.unexpected_keys:
        raise FIDError(f"{path}: not the TF-FID Inception weights (missing keys {missing[:3]}, "
                       f"unexpected keys {result.unexpected_keys[:3]}). " + missing_weights_message())
    return net.eval().requires_grad_(False).to(device)


# --------------------------------------------------------------------------------------------
# Features and statistics

def to_unit_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 NCHW (0..255) or float NCHW in [0, 1] -> float32 in [0, 1], 3 channels."""
    if images.ndim != 4:
        raise FIDError(f"expected images of shape (B, C, H, W), got {tuple(images.shape)}")
    x = images.float() / 255 if images.dtype == torch.uint8 else images.float()
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if x.shape[1] != 3:
        raise FIDError(f"FID needs RGB (or grey) images, got {x.shape[1]} channels")
    return x


@torch.no_grad()
def inception_features(net: FIDInceptionV3, images: torch.Tensor, chunk: int = 128) -> torch.Tensor:
    """(B, 2048) float64 features of uint8 NCHW images (or float in [0, 1]), ``chunk`` images at
    a time (each becomes 299 x 299 inside)."""
    dev = next(net.parameters()).device
    with _exact_fp32(dev):
        return torch.cat([net(to_unit_float(part.to(dev))).to(torch.float64) for part in images.split(chunk)])


@contextlib.contextmanager
def _exact_fp32(device: torch.device):
    """No TF32 in the feature network: its 10-bit mantissa moves features by ~1e-3, which is not
    what the published numbers were measured with."""
    if device.type != "cuda":
        yield
        return
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


class FeatureStats:
    """Running sum and sum of outer products in float64: the mean and covariance of any number of
    batches, mergeable across processes (``all_reduce``).

    While no more than ``keep`` images have been seen the features themselves are kept too: with
    n <= 2048 images the covariance has rank < n, and the distance needs only n x n matrices
    (``fid_against``), which makes small in-training evaluations cheap."""

    def __init__(self, dim: int = FEATURE_DIM, device="cpu", keep: int = FEATURE_DIM):
        self.count = 0
        self.keep = keep
        self.features: list[torch.Tensor] | None = []
        self.total = torch.zeros(dim, dtype=torch.float64, device=device)
        self.outer = torch.zeros(dim, dim, dtype=torch.float64, device=device)

    def update(self, features: torch.Tensor) -> None:
        f = features.to(self.total.device, torch.float64)
        self.count += f.shape[0]
        self.total += f.sum(0)
        self.outer += f.T @ f
        if self.features is not None:
            self.features = self.features + [f.cpu()] if self.count <= self.keep else None

    def all_reduce(self) -> None:
        if not distributed.active():
            return
        count = torch.tensor([self.count], dtype=torch.float64, device=self.total.device)
        for t in (count, self.total, self.outer):
            distributed.all_reduce_(t)
        self.count = int(count.item())
        self.features = None  # only this rank's share: no longer the whole set

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        if self.count < 2:
            raise FIDError(f"need at least 2 images for a covariance, got {self.count}")
        mu = (self.total / self.count).cpu().numpy()
        outer = self.outer.cpu().numpy()
        cov = (outer - self.count * np.outer(mu, mu)) / (self.count - 1)  # unbiased, as np.cov
        return mu, cov

    def fid_against(self, ref: "RefStats") -> float:
        mu, cov = self.mean_cov()
        if self.features is not None:
            feats = torch.cat(self.features).numpy()
            return frechet_distance_lowrank(feats, ref.mu, ref.sigma)
        return frechet_distance(mu, cov, ref.mu, ref.sigma)


@dataclass
class RefStats:
    mu: np.ndarray
    sigma: np.ndarray
    count: int
    resolution: int | None      # side of the images the statistics were computed from
    source: str = ""

    def mean_cov(self):
        return self.mu, self.sigma


def save_stats(path: str | os.PathLike, mu, sigma, count: int, resolution: int | None,
               source: str = "") -> None:
    """``.npz`` with mu and sigma (the keys EDM's and pytorch-fid's reference files use) plus
    count, resolution and a format tag."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = json.dumps({"format": STATS_FORMAT, "count": int(count), "resolution": resolution,
                       "source": source})
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, mu=np.asarray(mu, np.float64), sigma=np.asarray(sigma, np.float64),
             meta=np.array(meta))
    os.replace(tmp, path)


def load_stats(path: str | os.PathLike) -> RefStats:
    """Our own files, or EDM / pytorch-fid reference ``.npz`` files (mu, sigma; no resolution)."""
    path = Path(path)
    if not path.is_file():
        raise FIDError(f"reference statistics {path} do not exist; make them with "
                       f"'pdiff fid ref --data DATASET --out {path}'")
    try:
        with np.load(path, allow_pickle=False) as z:
            keys = set(z.files)
            if not {"mu", "sigma"} <= keys:
                raise FIDError(f"{path}: no 'mu' and 'sigma' arrays (found {sorted(keys)}); "
                               f"not a FID reference file")
            mu, sigma = z["mu"].astype(np.float64), z["sigma"].astype(np.float64)
            meta = json.loads(str(z["meta"])) if "meta" in keys else {}
    except (OSError, ValueError) as e:
        if isinstance(e, FIDError):
            raise
        raise FIDError(f"{path}: cannot read it as an .npz file ({e})") from None
    if mu.shape != (FEATURE_DIM,) or sigma.shape != (FEATURE_DIM, FEATURE_DIM):
        raise FIDError(f"{path}: mu {mu.shape} and sigma {sigma.shape} are not the 2048-d pool "
                       f"statistics of the FID Inception")
    return RefStats(mu, sigma, int(meta.get("count", 0)), meta.get("resolution"), str(path))


def check_resolution(ref: RefStats, resolution: int, allow_mismatch: bool = False) -> None:
    """FID between different resolutions is not the published number: refuse unless asked."""
    if ref.resolution is None or ref.resolution == resolution or allow_mismatch:
        return
    raise FIDError(f"reference {ref.source} was computed from {ref.resolution}x{ref.resolution} "
                   f"images but the images to score are {resolution}x{resolution}; compute a "
                   f"reference at {resolution} ('pdiff fid ref ... --resolution {resolution}') or "
                   f"pass --allow-resolution-mismatch if that is really what you want")


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((s + s.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)) in float64.

    tr((S1 S2)^(1/2)) equals the sum of the singular values of S1^(1/2) S2^(1/2) (both roots by
    eigh of the symmetric matrices). Unlike a general square root of the non-symmetric S1 S2, this
    never goes complex and keeps errors at float64 precision instead of its square root when the
    covariances are nearly singular (fewer images than 2048 dimensions)."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise FIDError(f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, "
                       f"sigma {s1.shape} vs {s2.shape}")
    tr_covmean = np.linalg.svd(_psd_sqrt(s1) @ _psd_sqrt(s2), compute_uv=False).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


# --------------------------------------------------------------------------------------------
# Sampling and scoring in one pass (``pdiff fid gen`` and the in-training evaluation)

@torch.no_grad()
def sample_stats(model, seeds, batch: int, resolution: int, channels: int, label_dim: int, options,
                 inception: FIDInceptionV3, device="cpu", progress=None, vae=None) -> FeatureStats:
    """Feature statistics of the images of ``seeds`` (this process's share under torchrun: the
    caller splits the seeds, this all-reduces the sums). No image is written. A latent model's
    samples are decoded by ``vae`` (a ``pdiff.vae.VAE``) first."""
    stats = FeatureStats(device=device)
    for chunk, images, _ in iter_uint8(model, seeds, batch, resolution, channels, label_dim, options, device,
                                       vae=vae):
        stats.update(inception_features(inception, images))
        if progress is not None:
            progress.update(len(chunk))
    stats.all_reduce()
    return stats


def image_size(canvas: int, vae=None) -> int:
    """The side of a model's images: its canvas, times the VAE's downsampling for a latent model."""
    return canvas * vae.downsample if vae is not None else canvas


NO_VAE_IN_RUN = "no VAE decodes them (set vae.source)"
NO_VAE_GIVEN = "its run names no VAE: give the one its latents came from with --vae"


def check_decodable(channels: int, vae, hint: str) -> None:
    """A model of latents (``channels`` not 1 or 3) needs a VAE to turn its samples into images for
    the Inception; ``hint`` says where the user gives one."""
    if vae is None and channels not in (1, 3):
        raise FIDError(f"the model makes {channels}-channel latents and {hint}")


def seed_sets(first: int, count: int, sets: int) -> list[list[int]]:
    """``sets`` disjoint runs of ``count`` consecutive seeds from ``first`` (EDM reports the min
    over three such runs)."""
    return [list(range(first + k * count, first + (k + 1) * count)) for k in range(sets)]


def summarize(fids: list[float]) -> dict:
    arr = np.asarray(fids, np.float64)
    return {"fid": [float(f) for f in fids], "mean": float(arr.mean()), "min": float(arr.min()),
            "std": float(arr.std(ddof=1)) if len(arr) > 1 else 0.0}


class FIDEvaluator:
    """FID of a model's samples against fixed reference statistics, for the training loop.

        ev = FIDEvaluator.maybe(ref="refs/celeba64.npz", inception="weights/pt_inception.pth",
                                num_images=5000)
        if ev: fid = ev.compute(ema_model, cfg)   # every N images

    The same seeds are used at every evaluation so the curve shows the model, not the noise.
    Under torchrun every rank must call it; each samples its share of the seeds."""

    def __init__(self, ref: RefStats | str | os.PathLike, inception: FIDInceptionV3 | str | os.PathLike,
                 num_images: int = 5000, batch: int = 64, first_seed: int = 0, options=None,
                 device=None, allow_resolution_mismatch: bool = False, vae=None):
        self.ref = ref if isinstance(ref, RefStats) else load_stats(ref)
        self.inception = inception if isinstance(inception, nn.Module) else load_inception(inception)
        self.num_images, self.batch, self.first_seed = int(num_images), int(batch), int(first_seed)
        self.options = options
        self.device = device
        self.allow_mismatch = allow_resolution_mismatch
        self.vae = vae                # a latent model's decoder (pdiff.vae.VAE), else None

    @classmethod
    def maybe(cls, ref, inception, channels: int = 3, **kwargs) -> "FIDEvaluator | None":
        """An evaluator, or None (with the reason printed once) when the reference statistics or
        the Inception weights are not available, or a latent model (``channels`` not 1 or 3) has no
        VAE to decode its samples: training goes on without FID."""
        if not ref:
            return None
        try:
            check_decodable(channels, kwargs.get("vae"), NO_VAE_IN_RUN)
        except FIDError as e:
            print(f"[pdiff] in-training FID is off: {e}", flush=True)
            return None
        try:
            return cls(ref, inception, **kwargs)
        except (FIDError, InceptionWeightsMissing) as e:
            print(f"[pdiff] in-training FID is off: {e}", flush=True)
            return None

    def compute(self, model, cfg, progress=None, no_vae_hint: str = NO_VAE_IN_RUN) -> float:
        """FID of ``model``'s samples of this evaluator's seeds (this rank's share); ``progress``
        (a progress bar) is told of every chunk sampled. A latent model without a VAE is refused
        with ``no_vae_hint`` (what the user should do)."""
        options = self.options or SampleOptions(sampler=cfg.sample, canvas=cfg.sample.canvas)
        resolution = cfg.data.resolution
        check_decodable(cfg.data.channels, self.vae, no_vae_hint)
        check_resolution(self.ref, image_size(options.canvas or resolution, self.vae), self.allow_mismatch)
        device = self.device or next(model.parameters()).device
        self.inception.to(device)
        seeds = range(self.first_seed, self.first_seed + self.num_images)
        seeds = list(seeds)[distributed.rank()::distributed.world_size()]     # this rank's share
        was_training = model.training
        model.eval()
        try:
            stats = sample_stats(model, seeds, self.batch, resolution, cfg.data.channels,
                                 cfg.network.label_dim, options, self.inception, device, progress, vae=self.vae)
        finally:
            model.train(was_training)
        return stats.fid_against(self.ref)


def frechet_distance_lowrank(features, mu2, sigma2) -> float:
    """``frechet_distance`` of the statistics of n feature rows against (mu2, sigma2), via n x n
    matrices. With X the centred features, S1 = X^T X / (n-1), and the non-zero eigenvalues of
    S2^(1/2) S1 S2^(1/2) are those of X S2 X^T / (n-1); tr((S1 S2)^(1/2)) is the sum of their roots."""
    x = np.asarray(features, np.float64)
    n = x.shape[0]
    if n < 2:
        raise FIDError(f"need at least 2 images for a covariance, got {n}")
    mu1 = x.mean(0)
    xc = x - mu1
    mu2, s2 = np.asarray(mu2, np.float64), np.asarray(sigma2, np.float64)
    if mu2.shape != mu1.shape or s2.shape != (mu1.size, mu1.size):
        raise FIDError(f"statistics do not match: features of dimension {mu1.size}, reference mu "
                       f"{mu2.shape}, sigma {s2.shape}")
    # rows of xc sum to zero: express them in an orthonormal basis of the complement of (1, ..., 1)
    # so the n-1 eigenvalues that matter are not mixed with the exact zero of the centring
    q, _ = np.linalg.qr(np.eye(n)[:, :n - 1] - 1.0 / n)
    y = q.T @ xc
    m = y @ ((s2 + s2.T) / 2) @ y.T / (n - 1)
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + (xc * xc).sum() / (n - 1) + np.trace(s2) - 2 * tr_covmean)
