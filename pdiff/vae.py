"""The image autoencoder of latent Patch Diffusion: diffusers' ``AutoencoderKL`` (the Stable Diffusion
VAE, or any other saved in its format), read from a local diffusers folder or a hub id. Needs the
``latent`` extra: ``pip install 'pdiff[latent]'``.

    vae = load_vae("stabilityai/sd-vae-ft-mse", "cuda")   # or a folder written by save_pretrained
    mean, std = vae.encode(images)        # uint8 (B, H, W, 3) -> the posterior N(mean, std^2) per latent pixel
    latents = vae.to_latent(mean + std * torch.randn_like(std))   # (z - shift) * scale: what the network sees
    images = vae.decode(latents)          # float (B, 3, H, W) in about [-1, 1], in batches on the VAE's device

``vae.record`` says which autoencoder this is (where it came from, the sha256 of its weights, scale,
shift, downsampling factor, latent channels). It goes into the manifest of the shards it encoded and
from there into the ``vae`` section of every run trained on them, so that a sampler handed another
VAE refuses it and names both (``check_same``).
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch

from .distributed import resolve_device
from .errors import UserError

INSTALL_HINT = "pip install 'pdiff[latent]' (diffusers)"


class VAEError(UserError, RuntimeError):
    """A VAE that cannot be loaded, or is not the one the latents were made with."""
    exit_code = 2


def weights_sha256(module: torch.nn.Module) -> str:
    """sha256 over the state_dict: each tensor's name, shape and float32 bytes in name order (the same
    weights give the same hash whether read from a folder, the hub cache, or built in memory)."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().to("cpu", torch.float32).contiguous()
        h.update(f"{name}:{tuple(t.shape)}\n".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def describe_record(record: dict) -> str:
    """A VAE record for messages: where it came from and the start of its weights' hash."""
    return f"{record.get('source') or '?'} (weights sha256 {str(record.get('sha256') or '?')[:12]}...)"


def check_same(expected: dict, got: dict, what: str) -> None:
    """Refuse ``got`` unless its weights are the ones ``expected`` records (``what`` says whose)."""
    if expected.get("sha256") and expected["sha256"] != got.get("sha256"):
        raise VAEError(f"{what} were made with the VAE {describe_record(expected)}, but the VAE given is "
                       f"{describe_record(got)}: its latents mean something else. Use the first one (or "
                       f"re-encode the data and retrain with the second).")


class VAE:
    """An AutoencoderKL in eval mode on one device, with its scale and shift (diffusers' convention:
    latent = (z - shift_factor) * scaling_factor, z in the autoencoder's own space)."""

    def __init__(self, model: torch.nn.Module, source: str, device: torch.device | str = "cpu",
                 sha256: str | None = None, decode_batch: int = 16):
        self.source = str(source)
        self.decode_batch = decode_batch
        self.sha256 = sha256 or weights_sha256(model)
        self.device = torch.device(device)
        self.model = model.to(self.device).eval().requires_grad_(False)
        cfg = model.config
        self.scale = float(cfg.scaling_factor if cfg.scaling_factor is not None else 1.0)
        self.shift = float(getattr(cfg, "shift_factor", None) or 0.0)
        self.latent_channels = int(cfg.latent_channels)
        self.downsample = 2 ** (len(cfg.block_out_channels) - 1)
        self.image_channels = int(cfg.in_channels)

    @property
    def record(self) -> dict:
        return {"source": self.source, "sha256": self.sha256, "class": type(self.model).__name__,
                "scale": self.scale, "shift": self.shift, "downsample": self.downsample,
                "latent_channels": self.latent_channels}

    def to_latent(self, z: torch.Tensor) -> torch.Tensor:
        return (z - self.shift) * self.scale

    def from_latent(self, latents: torch.Tensor) -> torch.Tensor:
        return latents / self.scale + self.shift

    @torch.no_grad()
    def encode(self, images: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images -> the posterior's (mean, std), each float32 (B, C', H/f, W/f) on the VAE's device
        (one encoder pass; the caller batches). Images are uint8 (B, H, W, C), as stored and as the
        pixel pipelines deliver them, or float (B, C, H, W) in [-1, 1]."""
        x = torch.as_tensor(np.ascontiguousarray(images) if isinstance(images, np.ndarray) else images)
        if x.dtype == torch.uint8 and x.ndim == 4 and x.shape[-1] == self.image_channels:
            x = x.to(self.device).permute(0, 3, 1, 2).float() / 127.5 - 1
        elif x.is_floating_point() and x.ndim == 4 and x.shape[1] == self.image_channels:
            x = x.to(self.device, torch.float32)
        else:
            raise ValueError(f"encode takes uint8 (B, H, W, {self.image_channels}) or float (B, {self.image_channels}, "
                             f"H, W) images, got {x.dtype} {tuple(x.shape)}")
        dist = self.model.encode(x).latent_dist
        return dist.mean.float(), dist.std.float()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, batch: int | None = None) -> torch.Tensor:
        """Latents as the network makes them (B, C', h, w) -> images float32 (B, C, h*f, w*f) in
        about [-1, 1], on the latents' device, decoded ``batch`` (``decode_batch``) at a time on the
        VAE's device."""
        out = [self.model.decode(self.from_latent(part.to(self.device, torch.float32))).sample.float()
               .to(latents.device) for part in latents.split(max(1, int(batch or self.decode_batch)))]
        return torch.cat(out)


def load_vae(source: str | Path, device: torch.device | str = "auto") -> VAE:
    """diffusers' AutoencoderKL from a local folder (``config.json`` + weights, as ``save_pretrained``
    writes; a full pipeline folder's ``vae/`` is found too) or a hub id, in float32 on ``device``."""
    try:
        from diffusers import AutoencoderKL
    except ImportError:
        raise VAEError(f"the VAE {source} needs the diffusers library: {INSTALL_HINT}") from None
    source = str(source)
    path = Path(source).expanduser()
    kwargs = {}
    if path.exists():
        if not path.is_dir():
            raise VAEError(f"VAE {source}: expected a diffusers folder (config.json and weights), found a file")
        if not (path / "config.json").exists() and (path / "vae" / "config.json").exists():
            kwargs["subfolder"] = "vae"
        elif not (path / "config.json").exists():
            raise VAEError(f"VAE {source}: no config.json in the folder (expected what AutoencoderKL.save_pretrained "
                           f"writes, or a pipeline folder with vae/)")
        source_for_load = str(path)
    elif source.startswith((".", "/", "~")) or source.count("/") != 1:
        raise VAEError(f"VAE {source}: no such folder (and not a hub id of the form owner/name)")
    else:
        source_for_load = source
    try:
        model = AutoencoderKL.from_pretrained(source_for_load, torch_dtype=torch.float32, low_cpu_mem_usage=False,
                                              **kwargs)
    except (OSError, ValueError, EnvironmentError) as e:
        raise VAEError(f"VAE {source}: cannot be loaded as a diffusers AutoencoderKL: {e}") from None
    return VAE(model, source, resolve_device(device))


def load_run_vae(cfg, override: str | None = None, device: torch.device | str = "auto") -> VAE | None:
    """The autoencoder that turns a latent run's samples into images: ``cfg.vae.source`` (the one its
    shards were encoded with) or ``override`` (a --vae), which must have the weights the run records;
    None when the run names none and no override is given. It decodes with the run's scale and shift
    (the data's: the latents the network learned are (z - shift) * scale)."""
    source = override or cfg.vae.source
    if not source:
        return None
    vae = load_vae(source, device)
    check_same({"source": cfg.vae.source, "sha256": cfg.vae.sha256}, vae.record,
               f"the latents this model learned ({cfg.data.path or 'its training data'})")
    if vae.latent_channels != cfg.data.channels:
        raise VAEError(f"VAE {source} has {vae.latent_channels} latent channels but the model makes "
                       f"{cfg.data.channels}-channel samples (a model of images needs no --vae)")
    vae.scale, vae.shift = float(cfg.vae.scale), float(cfg.vae.shift)
    vae.decode_batch = int(cfg.vae.decode_batch)
    return vae
