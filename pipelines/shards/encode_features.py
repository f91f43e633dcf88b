"""`pdiff shard --encode-features ENCODER`: a frozen encoder's feature grid of every image, computed once
at shard time and stored as the sample's ``.feat`` member (format.py), for repr.loss=align
(docs/representation.md). The training step never runs the encoder.

ENCODER is one of:

* ``FILE.py:FACTORY``: a Python file of yours and a function in it that returns a torch module (called
  with no arguments after ``torch.manual_seed(0)``, so a randomly initialised test network is the same
  every time). This runs your code, as any import would: give only files you trust.
* ``FILE.pt`` / ``.pth`` / ``.ts``: a TorchScript module (``torch.jit.save``), loaded with
  ``torch.jit.load`` (no pickled Python objects are unpickled).
* ``dinov2_vits14``, ``dinov2_vitb14``, ``dinov2_vitl14``, ``dinov2_vitg14``: DINOv2 through
  ``torch.hub.load("facebookresearch/dinov2", NAME)`` (torch's hub cache; downloaded on first use).
  The images are resized to 224 x 224 (bicubic) and normalized with ImageNet's mean and std, as REPA
  does; the grid is the 16 x 16 normalized patch tokens.

The contract of a module: float32 images (B, C, R, R) in [-1, 1] in, a feature grid (B, C_f, g, g) out
(square). The manifest's ``features`` record keeps the spec, the sha256 of the module's weights, g and
C_f; grids are stored float16, channels first.

Only this stage needs torch; the writer imports it with --encode-features only.
"""
from __future__ import annotations

import hashlib
import importlib.util
import io
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from pdiff.pipelines.shards.format import FEATURE_EXT
from pdiff.pipelines.shards.inputs import ShardInputError
from pdiff.pipelines.shards.preprocess import image_batches
from PIL import Image
from torch import nn
from torch.nn import functional as F

Result = tuple[int, "bytes | tuple | None", "str | None"]      # (input position, sample bytes, bad-input reason)
DINOV2 = ("dinov2_vits14", "dinov2_vitb14", "dinov2_vitl14", "dinov2_vitg14")
_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class DinoV2Grid(nn.Module):
    """DINOv2's normalized patch tokens as a (B, C_f, 16, 16) grid of [-1, 1] images (REPA's input)."""

    def __init__(self, model: nn.Module, side: int = 224):
        super().__init__()
        self.model, self.side = model, side
        self.register_buffer("mean", torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x + 1) / 2
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = F.interpolate(x, size=(self.side, self.side), mode="bicubic", align_corners=False)
        tokens = self.model.forward_features((x - self.mean) / self.std)["x_norm_patchtokens"]
        g = self.side // 14
        return tokens.transpose(1, 2).reshape(x.shape[0], -1, g, g)


def weights_sha256(module: nn.Module) -> str:
    """sha256 over the module's state (names, dtypes, shapes and bytes, in order)."""
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}\n".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def load_feature_encoder(spec: str, device: str | torch.device = "cpu") -> nn.Module:
    """The encoder ``spec`` names (see the module's docstring), in eval mode on ``device``."""
    file, _, factory = spec.rpartition(":") if spec.count(":") == 1 and spec.split(":")[0].endswith(".py") \
        else (None, None, None)
    if file:
        path = Path(file)
        if not path.is_file():
            raise ShardInputError(f"--encode-features {spec}: no file {path}")
        loaded = importlib.util.spec_from_file_location(f"pdiff_feature_encoder_{path.stem}", path)
        code = importlib.util.module_from_spec(loaded)
        try:
            loaded.loader.exec_module(code)
        except Exception as e:
            raise ShardInputError(f"--encode-features {spec}: importing {path} failed: {e!r}") from None
        make = getattr(code, factory, None)
        if not callable(make):
            raise ShardInputError(f"--encode-features {spec}: {path} has no function {factory!r}")
        torch.manual_seed(0)
        module = make()
    elif spec in DINOV2:
        module = DinoV2Grid(torch.hub.load("facebookresearch/dinov2", spec))
    elif Path(spec).suffix in (".pt", ".pth", ".ts") and Path(spec).is_file():
        try:
            module = torch.jit.load(spec, map_location="cpu")
        except RuntimeError as e:
            raise ShardInputError(f"--encode-features {spec}: not a TorchScript module ({e})") from None
    else:
        raise ShardInputError(f"--encode-features {spec!r}: expected FILE.py:FACTORY, a TorchScript FILE.pt "
                              f"(.pth, .ts) that exists, or one of {', '.join(DINOV2)}")
    if not isinstance(module, nn.Module):
        raise ShardInputError(f"--encode-features {spec}: {factory or 'the file'} gave a {type(module).__name__}, "
                              f"not a torch module")
    if str(device) == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return module.to(device).eval().requires_grad_(False)


class FeatureEncoder:
    """Sample bytes (png / jpeg / webp / raw R x R x C) -> (the same bytes, the feature grid's bytes),
    ``batch`` images per encoder pass; bad inputs pass through in their place."""

    def __init__(self, module: nn.Module, spec: str, resolution: int, channels: int, encoding: str,
                 batch: int = 32):
        self.module, self.resolution, self.channels = module, resolution, channels
        self.encoding, self.batch = encoding, max(1, int(batch))
        self.device = next(iter(module.buffers()), next(iter(module.parameters()), torch.zeros(0))).device
        probe = self._grid(np.zeros((1, resolution, resolution, channels), np.uint8))
        if probe.ndim != 4 or probe.shape[2] != probe.shape[3]:
            raise ShardInputError(f"--encode-features {spec}: gives {tuple(probe.shape)} for one {resolution}x"
                                  f"{resolution} image, expected a square grid (1, C_f, g, g)")
        self.record = {"source": spec, "sha256": weights_sha256(module), "grid": int(probe.shape[2]),
                       "channels": int(probe.shape[1]), "dtype": "float16", "layout": "chw", "ext": FEATURE_EXT}

    def _grid(self, pixels: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(pixels).to(self.device).permute(0, 3, 1, 2).float() / 127.5 - 1
        with torch.no_grad():
            return self.module(x).float().cpu()

    def _pixels(self, data: bytes) -> np.ndarray:
        r, c = self.resolution, self.channels
        if self.encoding == "raw":
            return np.frombuffer(data, np.uint8).reshape(r, r, c)
        img = np.asarray(Image.open(io.BytesIO(data)))
        return img.reshape(r, r, c)

    def stream(self, results: Iterable[list[Result]]) -> Iterator[list[Result]]:
        """The workers' chunks of results, re-cut into batches of ``batch`` images."""
        for pending in image_batches(results, self.batch):
            yield self.encode(pending)

    def encode(self, results: list[Result]) -> list[Result]:
        rows = [k for k, (_, data, _) in enumerate(results) if data is not None]
        if not rows:
            return results
        grids = self._grid(np.stack([self._pixels(results[k][1]) for k in rows])).numpy()
        out = list(results)
        for k, grid in zip(rows, grids):
            stored = grid.astype("<f2")
            if not np.isfinite(stored).all():
                why = "non-finite features: the encoder gave NaN or inf (or past float16's range) for this image"
                out[k] = (results[k][0], None, why)
            else:
                out[k] = (results[k][0], (results[k][1], stored.tobytes()), None)
        return out
