"""One tree of dataclasses for a whole run; YAML loads into it, dotted overrides patch it.

    cfg = load_config("pdiff/presets/tiny.yaml", ["train.batch=64", "patch.real_p=0.25"])

Unknown keys and values of the wrong type are errors naming the key and the file; so is a value
outside a closed set of choices (a ``Literal`` field). Open sets that grow by registration are
checked against their registries: network.arch against ``pdiff.networks.NETWORKS``, patch.mode
against the patch schedules. Progress is counted in images seen (EDM2): every duration and interval
below is in images.
"""
from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import yaml

from .errors import UserError

PRESET_DIR = Path(__file__).parent / "presets"


class ConfigError(UserError, ValueError):
    """A config that cannot run: the message names the key, the file and the value."""
    exit_code = 2


@dataclass
class NetworkConfig:
    arch: str = "ddpmpp"                  # a name in pdiff.networks.NETWORKS: ddpmpp | ncsnpp | adm | ...
    model_channels: int = 128             # base channels
    channel_mult: list[int] = field(default_factory=lambda: [1, 2, 2, 2])
    num_blocks: int = 4                   # residual blocks per resolution
    attn_resolutions: list[int] = field(default_factory=lambda: [16])
    dropout: float = 0.10
    label_dim: int = 0                    # number of classes; 0 = unconditional
    label_dropout: float = 0.0            # probability of dropping the label (classifier-free guidance)
    coord_embed: Literal["none", "fourier"] = "none"   # fourier: sin/cos features of the coordinates
    coord_freqs: int = 4                  # fourier: frequencies 2^0 .. 2^(k-1)


@dataclass
class DataConfig:
    path: str = ""                        # folder of WebDataset shards with manifest.json
    resolution: int = 64                  # R, the full image (or latent) size
    channels: int = 3
    backend: Literal["auto", "dali", "torch"] = "auto"   # auto: DALI where it is installed
    workers: int = 2                      # decoding threads (DALI) or DataLoader workers (torch)
    prefetch: int = 4                     # batches decoded ahead
    verify_checksums: bool = False        # sha256 of every shard against the manifest at start (sizes are always checked)
    xflip: bool = False                   # random horizontal flips (off: flips move coordinates)
    # A damaged sample (fails its CRC-32 or its decode): stop, naming it | skip: read the next good sample
    # in its place, count it, and stop past max_corrupt damaged samples (per process).
    on_corrupt: Literal["stop", "skip"] = "stop"
    max_corrupt: int = 100
    # In-memory mode: decode the whole dataset once into host memory (pinned) or onto the training
    # device and crop each step with one gather; refused, with the sizes, where it does not fit.
    cache: Literal["none", "host", "device"] = "none"


@dataclass
class PatchConfig:
    mode: str = "stochastic"              # a patch schedule: stochastic | progressive | full (plain EDM)
    real_p: float = 0.5                   # share of full-size steps (the paper's p)
    sizes: list[int] = field(default_factory=list)    # empty: {R/4, R/2, R}
    probs: list[float] = field(default_factory=list)  # empty: (2/5 (1-p), 3/5 (1-p), p)


@dataclass
class LossConfig:
    p_mean: float = -1.2
    p_std: float = 1.2
    sigma_data: float = 0.5


@dataclass
class OptimConfig:
    lr: float = 2e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.0
    warmup_images: int = 10_000_000       # linear learning-rate warm-up (EDM: 10 Mimg)
    grad_clip: float = 0.0                # 0 = no clipping
    # A step whose gradient is not finite: zero it (no host sync) | skip it (one host sync a step).
    nonfinite: Literal["zero", "skip"] = "zero"


@dataclass
class EMAConfig:
    halflife_images: int = 500_000        # EDM: 0.5 Mimg
    rampup_ratio: float = 0.05            # half-life at most this share of images seen; 0 = off


@dataclass
class TrainConfig:
    run_dir: str = "runs/default"
    seed: int = 0
    batch: int = 512                      # global batch of FULL images; a step of size s carries batch * R/s patches
    grad_accum: int = 1                   # micro-batches per step and rank
    duration_images: int = 200_000_000
    log_every_images: int = 100_000
    ckpt_every_images: int = 5_000_000
    snapshot_every_images: int = 5_000_000
    sample_every_images: int = 5_000_000
    keep_checkpoints: int = 3
    compile: bool = True
    precision: Literal["auto", "bf16", "fp32"] = "auto"   # auto: bf16 on CUDA, fp32 on CPU
    channels_last: bool = False
    kernels: Literal["auto", "triton", "torch"] = "auto"  # auto: Triton on CUDA, the torch references elsewhere
    wall_budget_s: float = 0.0            # stop cleanly after this many seconds; 0 = no budget
    deterministic: bool = False


@dataclass
class SamplerConfig:
    steps: int = 18
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0
    s_churn: float = 0.0
    s_min: float = 0.0
    s_max: float = float("inf")
    s_noise: float = 1.0
    guidance: float = 1.0                 # classifier-free guidance scale (1 = off)
    # Guide only for sigma in (lo, hi] (Kynkaanniemi et al. 2024); elsewhere the conditional model
    # alone (one network evaluation instead of two). [0, inf]: guide at every step.
    guidance_interval: list[float] = field(default_factory=lambda: [0.0, float("inf")])
    canvas: int = 0                       # 0 = the training resolution


@dataclass
class VAEConfig:
    """The image autoencoder of a latent model (diffusers AutoencoderKL, pdiff/vae.py). Training on
    shards from `pdiff shard --encode-vae` fills this in from their manifest."""
    source: str = ""                      # a local diffusers folder or a hub id; "" = none
    sha256: str = ""                      # of its weights, as recorded when the shards were encoded
    scale: float = 1.0                    # latent = (z - shift) * scale, z in the autoencoder's space (SD: 0.18215)
    shift: float = 0.0
    decode_batch: int = 16                # latents per decoder pass when sampling


@dataclass
class EvalConfig:
    fid_every_images: int = 0             # in-training FID every N images; 0 = off
    fid_images: int = 5000                # samples per in-training FID
    fid_batch: int = 64
    fid_ref: str = ""                     # reference statistics (pdiff fid ref)
    inception: str = ""                   # TF-FID Inception weights: a file or URL (cached)


@dataclass
class Config:
    name: str = "default"
    network: NetworkConfig = field(default_factory=NetworkConfig)
    data: DataConfig = field(default_factory=DataConfig)
    patch: PatchConfig = field(default_factory=PatchConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SamplerConfig = field(default_factory=SamplerConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# --------------------------------------------------------------------------------------------
# Loading, checking and overriding

def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp, where: str) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted for floats."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if isinstance(value, bool) or value not in choices:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(str, choices))}")
        return value
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            if arg is type(None) and value is None:
                return None
            try:
                return _coerce(value, arg, where)
            except ConfigError:
                pass
        raise ConfigError(f"{where}: expected {tp}, got {value!r}")
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list of {_type_name(item)}, got {value!r}")
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            if isinstance(value, str) and value.strip().lower() in ("inf", "+inf", "-inf", "nan"):
                return float(value)
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, where)
    raise ConfigError(f"{where}: unsupported type {tp}")


def _build(cls, data: dict, where: str):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            raise ConfigError(f"{where}: unknown key {key!r} (known: {', '.join(sorted(names))})")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in data.items()}
    return cls(**kwargs)


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(data: dict, source: str = "<dict>") -> Config:
    try:
        return _build(Config, data, "")
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def resolve_path(path: str | Path) -> Path:
    """A config file path, or the name of a preset (``tiny``, ``celeba64``...)."""
    p = Path(path)
    if p.exists():
        return p
    preset = PRESET_DIR / f"{path}.yaml"
    if preset.exists():
        return preset
    names = ", ".join(sorted(q.stem for q in PRESET_DIR.glob("*.yaml")))
    raise ConfigError(f"config {path}: no such file and no such preset (presets: {names})")


def _read_yaml(path: Path, seen: tuple = ()) -> dict:
    """Read a YAML file; ``base: other.yaml`` (relative, or a preset name) is merged underneath."""
    if path.resolve() in seen:
        raise ConfigError(f"{path}: 'base' chain loops back on itself")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    base = data.pop("base", None)
    if base is not None:
        base_path = path.parent / base if (path.parent / base).exists() else resolve_path(base)
        data = _merge(_read_yaml(base_path, seen + (path.resolve(),)), data)
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected section.key=value, e.g. train.batch=64")
    key, raw = text.split("=", 1)
    return key.strip().split("."), yaml.safe_load(raw) if raw.strip() else ""


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    data = json.loads(json.dumps(data))
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: {k!r} is not a section")
        node[keys[-1]] = value
    return data


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Defaults <- YAML file (with its ``base`` chain) <- dotted overrides, checked field by field."""
    data: dict = to_dict(Config())
    source = "<defaults>"
    if path is not None:
        p = resolve_path(path)
        source = str(p)
        data = _merge(data, _read_yaml(p))
    if overrides:
        try:
            data = apply_overrides(data, list(overrides))
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
        source += " + overrides"
    cfg = from_dict(data, source)
    validate(cfg, source)
    return cfg


def _finite(v) -> bool:
    return math.isfinite(v)


# Each field's allowed values beyond its type: (key, test, what it must be). The tests see the
# coerced value (ints for int fields, floats for float fields; NaN fails every comparison).
VALUE_RULES: list[tuple[str, Callable[[Any], bool], str]] = [
    ("network.model_channels", lambda v: v >= 1, "must be at least 1"),
    ("network.channel_mult", lambda v: len(v) >= 1 and min(v) >= 1,
     "must list at least one positive channel multiplier (one per resolution level)"),
    ("network.num_blocks", lambda v: v >= 1, "must be at least 1"),
    ("network.attn_resolutions", lambda v: all(r >= 1 for r in v), "must list positive resolutions"),
    ("network.dropout", lambda v: 0 <= v < 1, "must lie in [0, 1)"),
    ("network.label_dim", lambda v: v >= 0, "must be >= 0 (0 = unconditional)"),
    ("network.label_dropout", lambda v: 0 <= v < 1, "must lie in [0, 1)"),
    ("data.resolution", lambda v: v >= 2, "must be at least 2"),
    ("data.channels", lambda v: v >= 1, "must be at least 1"),
    ("data.workers", lambda v: v >= 0, "must be >= 0"),
    ("data.prefetch", lambda v: v >= 1, "must be at least 1"),
    ("data.max_corrupt", lambda v: v >= 0, "must be >= 0 (damaged samples tolerated with data.on_corrupt=skip)"),
    ("patch.real_p", lambda v: 0 <= v <= 1, "must lie in [0, 1]"),
    ("loss.p_mean", _finite, "must be a finite number"),
    ("loss.p_std", lambda v: _finite(v) and v >= 0, "must be a finite number >= 0"),
    ("loss.sigma_data", lambda v: _finite(v) and v > 0, "must be a finite number > 0"),
    ("optim.lr", lambda v: _finite(v) and v >= 0, "must be a finite number >= 0"),
    ("optim.betas", lambda v: len(v) == 2 and all(0 <= b < 1 for b in v), "must be two numbers in [0, 1)"),
    ("optim.eps", lambda v: _finite(v) and v > 0, "must be a finite number > 0"),
    ("optim.weight_decay", lambda v: _finite(v) and v >= 0, "must be a finite number >= 0"),
    ("optim.warmup_images", lambda v: v >= 0, "must be >= 0"),
    ("optim.grad_clip", lambda v: _finite(v) and v >= 0, "must be a finite number >= 0 (0 = no clipping)"),
    ("ema.halflife_images", lambda v: v >= 0, "must be >= 0"),
    ("ema.rampup_ratio", lambda v: _finite(v) and v >= 0, "must be a finite number >= 0 (0 = off)"),
    ("train.batch", lambda v: v >= 1, "must be at least 1"),
    ("train.grad_accum", lambda v: v >= 1, "must be at least 1 (micro-batches per step)"),
    ("train.duration_images", lambda v: v >= 0, "must be >= 0"),
    ("train.log_every_images", lambda v: v >= 0, "must be >= 0 (0 = at the end only)"),
    ("train.ckpt_every_images", lambda v: v >= 0, "must be >= 0 (0 = at the end only)"),
    ("train.snapshot_every_images", lambda v: v >= 0, "must be >= 0 (0 = at the end only)"),
    ("train.sample_every_images", lambda v: v >= 0, "must be >= 0 (0 = at the end only)"),
    ("train.keep_checkpoints", lambda v: v >= 1, "must be at least 1"),
    ("train.wall_budget_s", lambda v: v >= 0, "must be >= 0 (0 = no budget)"),
    ("sample.steps", lambda v: v >= 1, "must be at least 1"),
    ("sample.sigma_min", lambda v: _finite(v) and v > 0, "must be a finite number > 0"),
    ("sample.sigma_max", lambda v: _finite(v) and v > 0, "must be a finite number > 0"),
    ("sample.rho", lambda v: _finite(v) and v > 0, "must be a finite number > 0"),
    ("sample.s_churn", lambda v: _finite(v) and v >= 0, "must be a finite number >= 0"),
    ("sample.s_min", lambda v: v >= 0, "must be >= 0"),
    ("sample.s_max", lambda v: v >= 0, "must be >= 0 (inf = no limit)"),
    ("sample.s_noise", lambda v: _finite(v) and v >= 0, "must be a finite number >= 0"),
    ("sample.guidance", _finite, "must be a finite number (1 = off)"),
    ("sample.canvas", lambda v: v >= 0, "must be >= 0 (0 = the training resolution)"),
    ("vae.scale", lambda v: _finite(v) and v > 0, "must be a finite number > 0"),
    ("vae.shift", _finite, "must be a finite number"),
    ("vae.decode_batch", lambda v: v >= 1, "must be at least 1"),
    ("eval.fid_every_images", lambda v: v >= 0, "must be >= 0 (0 = off)"),
    ("eval.fid_images", lambda v: v >= 1, "must be at least 1"),
    ("eval.fid_batch", lambda v: v >= 1, "must be at least 1"),
]


def _value(cfg: Config, key: str):
    node = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


def validate(cfg: Config, source: str = "<config>") -> None:
    """The checks of values (VALUE_RULES), of what spans fields and of what needs a registry; each
    field's type and closed set of choices were checked while loading."""
    from .networks import NETWORKS
    from .schedule import SCHEDULES, PatchSchedule

    def bad(key, msg):
        raise ConfigError(f"{source}: {key}: {msg}")
    for key, ok, must in VALUE_RULES:
        value = _value(cfg, key)
        if not ok(value):
            bad(key, f"{must}, got {value!r}")
    if cfg.network.arch not in NETWORKS:
        bad("network.arch", f"{cfg.network.arch!r} is not a registered network (registered: {', '.join(NETWORKS)}; "
                            "a new one is added in pdiff/networks/__init__.py)")
    if cfg.patch.mode not in SCHEDULES:
        bad("patch.mode", f"{cfg.patch.mode!r} is not a registered patch schedule (registered: "
                          f"{', '.join(SCHEDULES)}; a new one is added in pdiff/schedule/__init__.py)")
    check_guidance_interval(cfg.sample.guidance_interval, "sample.guidance_interval", bad)
    try:
        PatchSchedule.from_config(cfg)
    except ValueError as e:
        bad("patch", str(e))
    if cfg.network.coord_embed == "fourier" and cfg.network.coord_freqs < 1:
        bad("network.coord_freqs", f"must be >= 1 with network.coord_embed=fourier, got {cfg.network.coord_freqs}")
    if cfg.sample.sigma_max <= cfg.sample.sigma_min:
        bad("sample.sigma_max", f"must be above sample.sigma_min ({cfg.sample.sigma_min}), got {cfg.sample.sigma_max}")
    if cfg.sample.canvas and cfg.sample.canvas < cfg.data.resolution:
        bad("sample.canvas", f"must be 0 or at least data.resolution ({cfg.data.resolution}), got {cfg.sample.canvas}")


def check_guidance_interval(interval, key: str, bad) -> None:
    if len(interval) != 2 or not 0 <= interval[0] < interval[1]:
        bad(key, f"must be [lo, hi] with 0 <= lo < hi (guidance for sigma in (lo, hi]), got {list(interval)}")


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(dump_yaml(cfg))
