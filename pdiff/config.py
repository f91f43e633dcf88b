"""One tree of dataclasses for a whole run; YAML loads into it, dotted overrides patch it.

    cfg = load_config("pdiff/presets/tiny.yaml", ["train.batch=64", "patch.real_p=0.25"])

Unknown keys (with a did-you-mean), keys given twice and values of the wrong type are errors naming
the key and the file; so is a value outside a closed set of choices (a ``Literal`` field). Open
sets that grow by registration are checked against their registries: network.arch against
``pdiff.networks.NETWORKS``, patch.mode against the patch schedules. Progress is counted in images
seen (EDM2): every duration and interval below is in images.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Literal

import yaml

from .errors import UserError
from .schedule import SCHEDULES, PatchSchedule
from .knobs import knob
from .network_config import NetworkConfig, common_keys

PRESET_DIR = Path(__file__).parent / "presets"


class ConfigError(UserError, ValueError):
    """A config that cannot run: the message names the key, the file and the value."""
    exit_code = 2
    every_rank = True     # every rank reads the same config


DEFAULT_ARCH = "ddpmpp"


def _networks() -> dict:
    """pdiff.networks.NETWORKS: network.arch -> its config class and builder. Imported on use: the
    networks import torch, and pdiff.config stays importable without it (the shard writer reads it)."""
    from .networks import NETWORKS     # torch (seconds): a config loads and prints without it
    return NETWORKS


def default_network() -> NetworkConfig:
    """The network section's default: DDPM++ with its config's defaults. Each network's keys live in
    its own dataclass, registered with it (pdiff/networks/: NETWORKS maps network.arch to it)."""
    return _networks()[DEFAULT_ARCH].config(arch=DEFAULT_ARCH)


@dataclass
class DataConfig:
    path: str = knob("", "folder of shards written by `pdiff shard` (with manifest.json), or its URL: s3://, gs://, "
                         "http(s):// (docs/object_storage.md)")
    resolution: int = knob(64, "R, the side of the full image (or latent); default: the shards'")
    channels: int = knob(3, "channels of an image (or latent); default: the shards'")
    backend: Literal["auto", "dali", "torch"] = knob("auto", "data loader: auto is DALI where it is installed")
    workers: int = knob(2, "decoding threads (DALI) or DataLoader workers (torch)")
    prefetch: int = knob(4, "batches decoded ahead")
    verify_checksums: bool = knob(False, "check every shard's sha256 against the manifest at start (sizes are always "
                                  "checked: at start, or from shard format 4 on when a shard is first read)")
    xflip: bool = knob(False, "random horizontal flips (off by default: a flip moves the coordinates)")
    on_corrupt: Literal["stop", "skip"] = knob(
        "stop", "a damaged sample (CRC-32 or decode): stop naming it, or skip: read the next good sample in its place")
    max_corrupt: int = knob(100, "data.on_corrupt=skip: stop past this many damaged samples (per process)")
    cache: Literal["none", "host", "device"] = knob(
        "none", "in-memory mode: decode the whole dataset once into host memory or onto the device, crop "
                "each step with one gather (refused, with the sizes, where it does not fit)")
    cache_dir: str = knob("", "data.path a URL: the local folder its shards are fetched into "
                              "(empty: ~/.cache/pdiff/shards)")
    cache_limit_gb: float = knob(0.0, "data.path a URL: the most GB of shards kept in data.cache_dir (0 = no limit)")


@dataclass
class PatchConfig:
    mode: str = knob("stochastic", "the patch schedule, a name in pdiff.schedule.SCHEDULES (full = plain EDM)")
    real_p: float = knob(0.5, "share of full-size steps, the paper's p (with patch.probs given: their full-size entry)")
    sizes: list[int] = knob([], "patch sizes; empty: {R/4, R/2, R} from 64 px, {R/2, R} below (docs/patch_defaults.md)")
    probs: list[float] = knob([], "probability of each of patch.sizes; empty: (2/5 (1-p), 3/5 (1-p), p), or (1-p, p)")
    p_mean: list[float] = knob([], "per patch size (aligned with patch.sizes): mean of ln(sigma); empty: loss.p_mean")
    p_std: list[float] = knob([], "per patch size (aligned with patch.sizes): std of ln(sigma); empty: loss.p_std")


@dataclass
class LossConfig:
    p_mean: float = knob(-1.2, "mean of ln(sigma) of the training noise levels (EDM's P_mean)")
    p_std: float = knob(1.2, "standard deviation of ln(sigma) (EDM's P_std)")
    sigma_data: float = knob(0.5, "standard deviation of the data (EDM's sigma_data)")
    weighting: Literal["edm", "learned"] = knob(
        "edm", "edm: lambda(sigma) alone; learned: EDM2's uncertainty u(sigma) (an MLP over c_noise), "
               "loss / exp(u) + u")
    logvar_channels: int = knob(128, "loss.weighting=learned: Fourier features of c_noise the u(sigma) MLP reads")


@dataclass
class OptimConfig:
    lr: float = knob(2e-4, "Adam's learning rate after the warm-up (inv_sqrt: EDM2's ref_lr)")
    schedule: Literal["warmup", "inv_sqrt"] = knob(
        "warmup", "warmup: lr after a linear warm-up; inv_sqrt: then lr / sqrt(max(images / ref_images, 1)) (EDM2)")
    ref_images: int = knob(143_360_000, "inv_sqrt: images after which the decay starts (EDM2: 70k x 2048)")
    betas: list[float] = knob([0.9, 0.999], "Adam's beta1, beta2")
    eps: float = knob(1e-8, "Adam's epsilon")
    weight_decay: float = knob(0.0, "Adam's L2 weight decay")
    warmup_images: int = knob(10_000_000, "images over which the learning rate rises linearly from 0 (EDM: 10 Mimg)")
    grad_clip: float = knob(0.0, "clip the gradient's global norm to this (0 = no clipping)")
    nonfinite: Literal["zero", "skip"] = knob(
        "zero", "a step whose gradient is not finite: zero it (no host sync) or skip it (one host sync a step)")


# A power EMA's sigma_rel is at most sqrt(1/12) = 0.2887 (gamma -> 0: the plain average of all weights so
# far): ema.stds are checked against it here, and pdiff.ema's profile arithmetic uses it.
STD_MAX = math.sqrt(1 / 12)


@dataclass
class ReprConfig:
    """A representation loss on the activations of one network block, on the patch of each step
    (docs/representation.md). Off by default."""
    loss: Literal["none", "dispersive", "align"] = knob(
        "none", "dispersive: Wang & He's spread-apart term; align: REPA's cosine alignment to the features "
                "stored by `pdiff shard --encode-features`")
    block: str = knob("", "the network module whose output it acts on, a name from named_modules() "
                          "(e.g. enc.16x16_block0; `pdiff info --blocks` lists them)")
    weight: float = knob(0.5, "the term's weight next to the EDM loss (dispersive: the paper's lambda, REPA: lambda)")
    temperature: float = knob(0.5, "dispersive: tau of exp(-||z_i - z_j||^2 / (d tau))")
    head_channels: int = knob(2048, "align: hidden width of the projection head (REPA's 3-layer SiLU MLP)")
    until_images: int = knob(0, "switch the term off after this many images (0 = never)")
    feature_channels: int = knob(0, "align: channels of the stored feature grids; default: the shards'")


@dataclass
class EMAConfig:
    # halflife: EDM's EMA (one average). power: EDM2's power-function EMAs, one per sigma_rel in
    # ``stds``, snapshotted every train.snapshot_every_images so that `pdiff ema reconstruct` can
    # make the average of any other sigma_rel afterwards (docs/posthoc_ema.md).
    mode: Literal["halflife", "power"] = knob("halflife", "halflife: EDM's EMA; power: EDM2's power-function EMAs "
                                                          "(ema.stds), for post-hoc EMA (pdiff ema)")
    halflife_images: int = knob(500_000, "EMA half-life in images (EDM: 0.5 Mimg); halflife mode")
    rampup_ratio: float = knob(0.05, "half-life at most this share of the images seen (0 = off); halflife mode")
    stds: list[float] = knob([0.050, 0.100], "sigma_rel of each tracked power EMA (EDM2's); power mode")


@dataclass
class TrainConfig:
    run_dir: str = knob("runs/default", "the run folder: config, logs, checkpoints, snapshots, samples")
    seed: int = knob(0, "seed of the initial weights and of every random draw of a step")
    batch: int = knob(512, "global batch of FULL images; a step of patch size s carries batch * R/s patches")
    grad_accum: int = knob(1, "micro-batches per step and process")
    duration_images: int = knob(200_000_000, "train until this many images are seen")
    log_every_images: int = knob(100_000, "log (console, log.jsonl, TensorBoard) every this many images")
    ckpt_every_images: int = knob(5_000_000, "checkpoint every this many images")
    snapshot_every_images: int = knob(5_000_000, "write an EMA snapshot every this many images")
    sample_every_images: int = knob(5_000_000, "write a sample grid every this many images and at the end; "
                                               "-1: at the end only; 0: never")
    keep_checkpoints: int = knob(3, "newest complete checkpoints kept")
    compile: bool = knob(True, "torch.compile the network (one graph per patch size)")
    compile_backend: Literal["inductor", "aot_eager", "eager", "cudagraphs"] = knob(
        "inductor", "torch.compile's backend: inductor generates kernels; aot_eager traces the same graphs "
                    "without generating code (debugging; the CPU tests of recompiles)")
    precision: Literal["auto", "bf16", "fp32"] = knob("auto", "auto: bf16 autocast on CUDA, fp32 on the CPU")
    channels_last: bool = knob(False, "channels_last weights and activations")
    kernels: Literal["auto", "triton", "torch"] = knob("auto", "auto: the Triton kernels on CUDA, their torch "
                                                               "references elsewhere")
    wall_budget_s: float = knob(0.0, "stop cleanly (checkpoint, snapshot) after this many seconds (0 = no budget)")
    deterministic: bool = knob(False, "torch.use_deterministic_algorithms (slower)")


@dataclass
class SamplerConfig:
    steps: int = knob(18, "Heun steps N (2N - 1 network evaluations)")
    sigma_min: float = knob(0.002, "lowest noise level")
    sigma_max: float = knob(80.0, "highest noise level")
    rho: float = knob(7.0, "time-step exponent (EDM's rho)")
    s_churn: float = knob(0.0, "stochasticity S_churn (0 = deterministic)")
    s_min: float = knob(0.0, "churn only for sigma >= S_tmin")
    s_max: float = knob(float("inf"), "churn only for sigma <= S_tmax")
    s_noise: float = knob(1.0, "S_noise, the churn noise's scale")
    guidance: float = knob(1.0, "classifier-free guidance scale (1 = off; needs a conditional model)")
    # Guide only for sigma in (lo, hi] (Kynkaanniemi et al. 2024); elsewhere the conditional model
    # alone (one network evaluation instead of two).
    guidance_interval: list[float] = knob([0.0, float("inf")], "guide only for sigma in (lo, hi] "
                                          "(Kynkaanniemi et al. 2024); [0, inf]: at every step")
    canvas: int = knob(0, "side of the sampled image; 0 = the training resolution, larger extrapolates")


@dataclass
class VAEConfig:
    """The image autoencoder of a latent model (diffusers AutoencoderKL, pdiff/vae.py). Training on
    shards from `pdiff shard --encode-vae` fills this in from their manifest."""
    source: str = knob("", "a local diffusers folder or a hub id (\"\" = none); default: the shards'")
    sha256: str = knob("", "of its weights, as recorded when the shards were encoded")
    scale: float = knob(1.0, "latent = (z - shift) * scale, z in the autoencoder's space (SD: 0.18215)")
    shift: float = knob(0.0, "see vae.scale")
    decode_batch: int = knob(16, "latents per decoder pass when sampling")


@dataclass
class EvalConfig:
    fid_every_images: int = knob(0, "FID during training every this many images (0 = off)")
    fid_images: int = knob(5000, "samples per in-training FID")
    fid_batch: int = knob(64, "batch of the in-training FID's sampling")
    fid_ref: str = knob("", "reference statistics (.npz from `pdiff fid ref`)")
    inception: str = knob("", "TF-FID Inception weights, a file or URL; empty: the cached standard file")


@dataclass
class Config:
    name: str = knob("default", "the run's name (printed and stored with it)")
    network: NetworkConfig = field(default_factory=default_network)
    data: DataConfig = field(default_factory=DataConfig)
    patch: PatchConfig = field(default_factory=PatchConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    repr: ReprConfig = field(default_factory=ReprConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SamplerConfig = field(default_factory=SamplerConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    # The keys the user gave, each with where (their config file or a non-preset base of it, or
    # "the command line"): values a dataset's manifest must agree with rather than replace. Preset
    # values and defaults are not in it. Not a field: not saved, not printed.
    given: ClassVar[dict[str, str]] = {}


# --------------------------------------------------------------------------------------------
# Loading, checking and overriding

def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp))


def _number(value: Any) -> int | float | None:
    """An int or float from a number or from text that spells one, else None.

    YAML 1.1 (PyYAML) reads ``1e-4``, ``1E-4`` and ``2e8`` as strings (it wants a dot before the
    exponent), so any float literal in text is taken here: ``lr: 1e-4`` is 0.0001."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, str) and value.strip():
        text = value.strip()
        try:
            return int(text)
        except ValueError:
            pass
        try:
            return float(text)
        except ValueError:
            return None
    return None


def _coerce(value: Any, tp, where: str) -> Any:
    """Check ``value`` against the annotation ``tp``: ints are accepted for floats, integral floats
    (``2e8``) for ints, and number literals in text for both."""
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
            example = "[8,16,32]" if item is int else "[0.9,0.999]" if item is float else "[a,b]"
            raise ConfigError(f"{where}: expected a list of {_type_name(item)}, got {value!r}; write a list in "
                              f"brackets, e.g. {where}={example}")
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is float:
        number = _number(value)
        if number is None:
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(number)
    if tp is int:
        number = _number(value)
        if number is None or (isinstance(number, float) and not number.is_integer()):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return int(number)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if tp is NetworkConfig:
        return _build_network(value, where)
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
            hint = _did_you_mean(str(key), names, where)
            raise ConfigError(f"{where or 'the top level'}: unknown key {key!r}{hint} "
                              f"(known: {', '.join(sorted(names))})")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in data.items()}
    return cls(**kwargs)


def _build_network(value, where: str) -> NetworkConfig:
    """The network section into the config dataclass of its arch (NETWORKS): a key of another arch is
    an error naming the arches that have it."""
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a mapping with arch and its keys, got {value!r}")
    NETWORKS = _networks()
    arch = value.get("arch", DEFAULT_ARCH)
    if not isinstance(arch, str) or arch not in NETWORKS:
        raise ConfigError(f"{where}.arch: {arch!r} is not a registered network (registered: {', '.join(NETWORKS)}; "
                          "a new one is added in pdiff/networks/__init__.py)")
    keys = NETWORKS[arch].keys()
    for key in value:
        if key not in keys:
            owners = [a for a, spec in NETWORKS.items() if key in spec.keys()]
            has = (f"it is a key of network.arch={' | '.join(owners)}" if owners else "no network has it")
            raise ConfigError(f"{where}.{key}: not a key of network.arch={arch} ({has}); the keys of {arch}: "
                              f"{', '.join(keys)} (`pdiff config network` lists every arch's)")
    return _build(NETWORKS[arch].config, {**value, "arch": arch}, where)


def _switch_arch(network: dict, arch) -> dict:
    """The network section under one that sets ``arch``: kept when the arch stays, cut to the keys
    every network shares when it changes (the other arch's keys, and its defaults, do not carry over)."""
    if arch is None or arch == network.get("arch", DEFAULT_ARCH):
        return network
    return {k: v for k, v in network.items() if k in common_keys()}


def _did_you_mean(key: str, names: set[str], where: str) -> str:
    """", did you mean 'lr'?" for a misspelled key: a close spelling (difflib), the initials of a
    long name (learning_rate -> lr), a word of it (batch_size -> batch), or the same key in another
    section (train.lr -> optim.lr); "" when nothing is near."""
    words = [w for w in key.lower().split("_") if w]
    near = difflib.get_close_matches(key.lower(), sorted(names), n=1, cutoff=0.6)
    near = near or [n for n in sorted(names) if n == "".join(w[0] for w in words) or (len(words) > 1 and n in words)]
    if near:
        return f", did you mean {(where + '.' if where else '') + near[0]!r}?"
    elsewhere = [k for k in _all_keys(Config()) if k.rsplit(".", 1)[-1] == key and k.rsplit(".", 1)[0] != where]
    return f", did you mean {elsewhere[0]!r}?" if elsewhere else ""


def _all_keys(node, prefix: str = "") -> list[str]:
    """Every dotted key of a config tree (sections and their fields)."""
    keys = []
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        keys.append(prefix + f.name)
        if dataclasses.is_dataclass(value):
            keys += _all_keys(value, prefix + f.name + ".")
    return keys


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        if k == "network" and isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(_switch_arch(out[k], v.get("arch")), v)
        else:
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
    if p.is_dir():
        inside = p / "config.yaml"
        hint = (f"; {inside} is the config of the run in it: --config {inside}" if inside.is_file()
                else "; give a YAML file or a preset name")
        raise ConfigError(f"config {path}: is a folder, not a YAML file{hint}")
    if p.exists():
        return p
    preset = PRESET_DIR / f"{path}.yaml"
    if preset.exists():
        return preset
    names = ", ".join(sorted(q.stem for q in PRESET_DIR.glob("*.yaml")))
    raise ConfigError(f"config {path}: no such file and no such preset (presets: {names})")


def _leaf_keys(data: dict, prefix: str = "") -> list[str]:
    """Dotted keys of the values in a nested mapping (``{"data": {"path": ..}}`` -> ``data.path``)."""
    keys = []
    for k, v in data.items():
        key = f"{prefix}{k}"
        keys += _leaf_keys(v, key + ".") if isinstance(v, dict) else [key]
    return keys


def is_preset(path: Path) -> bool:
    return path.resolve().parent == PRESET_DIR.resolve()


def _read_yaml(path: Path, seen: tuple = (), given: dict | None = None) -> dict:
    """Read a YAML file; ``base: other.yaml`` (relative, or a preset name) is merged underneath.
    The keys of files that are not presets go into ``given`` (key -> file)."""
    if path.resolve() in seen:
        raise ConfigError(f"{path}: 'base' chain loops back on itself")
    try:
        data = load_yaml(path.read_text(), str(path)) or {}
    except OSError as e:
        raise ConfigError(f"{path}: cannot read it ({e.strerror or e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    base = data.pop("base", None)
    if given is not None and not is_preset(path):
        for key in _leaf_keys(data):        # a file's own keys win over its bases'
            given.setdefault(key, str(path))
    if base is not None:
        base_path = path.parent / base if (path.parent / base).exists() else resolve_path(base)
        data = _merge(_read_yaml(base_path, seen + (path.resolve(),), given), data)
    return data


class UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a mapping holding a key twice (PyYAML keeps the last value, so a
    repeated key or section silently drops the other). Every YAML pdiff reads goes through it."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            first: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":      # `<<: *base`: overriding it is its purpose
                    continue
                key, line = self.construct_object(key_node, deep=True), key_node.start_mark.line + 1
                try:
                    if key in first:
                        raise DuplicateKey(key, line, first[key])
                    first[key] = line
                except TypeError:       # an unhashable key: SafeLoader's own error says so
                    continue
        return super().construct_mapping(node, deep=deep)


class DuplicateKey(yaml.YAMLError):
    def __init__(self, key, line: int, first_line: int):
        super().__init__(key, line, first_line)
        self.key, self.line, self.first_line = key, line, first_line


def load_yaml(text: str, where: str):
    """The YAML document in ``text`` (read from ``where``, a file or "the command line"): ConfigError
    for invalid YAML or a key given twice in one mapping, naming the file, the line and the key."""
    try:
        return yaml.load(text, Loader=UniqueKeyLoader)
    except DuplicateKey as e:
        raise ConfigError(f"{where}:{e.line}: duplicate key {e.key!r} (first given on line {e.first_line}); "
                          f"give each key and section once") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: not valid YAML: {e}") from None


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected section.key=value, e.g. train.batch=64")
    key, raw = text.split("=", 1)
    return key.strip().split("."), load_yaml(raw, f"override {text!r}") if raw.strip() else ""


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    data = json.loads(json.dumps(data))
    # network.arch first: a change of arch drops the other arch's keys, not the keys given with it.
    overrides = sorted(overrides, key=lambda text: parse_override(text)[0] != ["network", "arch"])
    for text in overrides:
        keys, value = parse_override(text)
        if keys == ["network", "arch"] and isinstance(data.get("network"), dict):
            data["network"] = _switch_arch(data["network"], value)
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
    given: dict[str, str] = {}
    if path is not None:
        p = resolve_path(path)
        source = str(p)
        file_given: dict[str, str] = {}
        data = _merge(data, _read_yaml(p, given=file_given))
        given.update(file_given)
    if overrides:
        try:
            data = apply_overrides(data, list(overrides))
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
        given.update({".".join(parse_override(text)[0]): "the command line" for text in overrides})
        source += " + overrides"
    cfg = from_dict(data, source)
    cfg.given = given
    validate(cfg, source)
    return cfg


def _finite(v) -> bool:
    return math.isfinite(v)


# Each field's allowed values beyond its type: (key, test, what it must be). The tests see the
# coerced value (ints for int fields, floats for float fields; NaN fails every comparison).
VALUE_RULES: list[tuple[str, Callable[[Any], bool], str]] = [
    ("data.resolution", lambda v: v >= 2, "must be at least 2"),
    ("data.channels", lambda v: v >= 1, "must be at least 1"),
    ("data.workers", lambda v: v >= 0, "must be >= 0"),
    ("data.prefetch", lambda v: v >= 1, "must be at least 1"),
    ("data.cache_limit_gb", lambda v: _finite(v) and v >= 0, "must be a finite number >= 0 (0 = no limit)"),
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
    ("optim.ref_images", lambda v: v >= 1, "must be at least 1"),
    ("loss.logvar_channels", lambda v: v >= 1, "must be at least 1"),
    ("optim.grad_clip", lambda v: _finite(v) and v >= 0, "must be a finite number >= 0 (0 = no clipping)"),
    ("repr.weight", lambda v: _finite(v) and v >= 0, "must be a finite number >= 0"),
    ("repr.temperature", lambda v: _finite(v) and v > 0, "must be a finite number > 0"),
    ("repr.head_channels", lambda v: v >= 1, "must be at least 1"),
    ("repr.until_images", lambda v: v >= 0, "must be >= 0 (0 = never switched off)"),
    ("ema.halflife_images", lambda v: v >= 0, "must be >= 0"),
    ("ema.rampup_ratio", lambda v: _finite(v) and v >= 0, "must be a finite number >= 0 (0 = off)"),
    ("train.batch", lambda v: v >= 1, "must be at least 1"),
    ("train.grad_accum", lambda v: v >= 1, "must be at least 1 (micro-batches per step)"),
    ("train.duration_images", lambda v: v >= 0, "must be >= 0"),
    ("train.log_every_images", lambda v: v >= 0, "must be >= 0 (0 = at the end only)"),
    ("train.ckpt_every_images", lambda v: v >= 0, "must be >= 0 (0 = at the end only)"),
    ("train.snapshot_every_images", lambda v: v >= 0, "must be >= 0 (0 = at the end only)"),
    ("train.sample_every_images", lambda v: v >= -1, "must be >= -1 (-1 = at the end only, 0 = never)"),
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
    ("sample.guidance_interval", lambda v: len(v) == 2 and 0 <= v[0] < v[1],
     "must be [lo, hi] with 0 <= lo < hi (guidance for sigma in (lo, hi])"),
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
    field's type and closed set of choices were checked while loading; the network's rules are its
    config class's (``rules``)."""
    NETWORKS = _networks()

    def bad(key, msg):
        raise ConfigError(f"{source}: {key}: {msg}")
    for key, ok, must in VALUE_RULES:
        value = _value(cfg, key)
        if not ok(value):
            bad(key, f"{must}, got {value!r}")
    for name, ok, must in type(cfg.network).all_rules():
        if not ok(getattr(cfg.network, name)):
            bad(f"network.{name}", f"{must}, got {getattr(cfg.network, name)!r}")
    if cfg.network.arch not in NETWORKS:
        bad("network.arch", f"{cfg.network.arch!r} is not a registered network (registered: {', '.join(NETWORKS)}; "
                            "a new one is added in pdiff/networks/__init__.py)")
    if not isinstance(cfg.network, NETWORKS[cfg.network.arch].config):
        bad("network.arch", f"{cfg.network.arch} takes a {NETWORKS[cfg.network.arch].config.__name__}, the network "
                            f"section holds a {type(cfg.network).__name__}: build it with "
                            f"pdiff.networks.network_config({cfg.network.arch!r}, ...)")
    p = cfg.patch
    for key in ("p_mean", "p_std"):
        values = getattr(p, key)
        if values and len(values) != len(p.sizes):
            bad(f"patch.{key}", f"{values}: give one value per patch size of patch.sizes ({p.sizes or 'not given'}), "
                                f"in its order, or none to use loss.{key} for every size")
        if not all(math.isfinite(v) for v in values) or (key == "p_std" and any(v < 0 for v in values)):
            bad(f"patch.{key}", f"{values}: must be finite numbers" + (" >= 0" if key == "p_std" else ""))
    if cfg.patch.mode not in SCHEDULES:
        bad("patch.mode", f"{cfg.patch.mode!r} is not a registered patch schedule (registered: "
                          f"{', '.join(SCHEDULES)}; a new one is added in pdiff/schedule/__init__.py)")
    # With data.path set and no data.resolution given, the resolution comes from the data
    # (fill_from_data), which checks what depends on it then.
    if not resolution_from_data(cfg):
        check_resolution_dependent(cfg, source)
    if cfg.ema.mode == "power":
        if (not cfg.ema.stds or any(not 0 < s < STD_MAX for s in cfg.ema.stds)
                or len(set(cfg.ema.stds)) < len(cfg.ema.stds)):
            bad("ema.stds", f"{cfg.ema.stds}: give one or more distinct sigma_rel values in (0, {STD_MAX:.4f}) "
                            "(EDM2 tracks [0.05, 0.1])")
    if cfg.network.coord_embed == "fourier" and cfg.network.coord_freqs < 1:
        bad("network.coord_freqs", f"must be >= 1 with network.coord_embed=fourier, got {cfg.network.coord_freqs}")
    if cfg.sample.sigma_max <= cfg.sample.sigma_min:
        bad("sample.sigma_max", f"must be above sample.sigma_min ({cfg.sample.sigma_min}), got {cfg.sample.sigma_max}")
    if cfg.train.kernels == "triton":
        from pdiff.kernels import triton_available     # torch and Triton: only when train.kernels=triton
        if not triton_available():
            bad("train.kernels", "triton, but Triton cannot be imported here: install it (pip install triton), "
                                 "or use auto (Triton where it is installed, on CUDA) or torch")


def resolution_from_data(cfg: Config) -> bool:
    """Whether data.resolution is still to be taken from the data (data.path set, no value given)."""
    return bool(cfg.data.path) and "data.resolution" not in cfg.given


def check_resolution_dependent(cfg: Config, source: str) -> None:
    """The settings that must fit data.resolution: the patch sizes, the sampling canvas and repr.block
    (the U-Nets name their blocks by resolution)."""
    try:
        PatchSchedule.from_config(cfg)      # patch.sizes / probs against each other and the resolution
    except ValueError as e:
        raise ConfigError(f"{source}: {e}") from None
    p, R = cfg.patch, cfg.data.resolution
    if ("patch.real_p" in cfg.given and p.mode != "full" and p.probs and R in p.sizes
            and abs(p.probs[p.sizes.index(R)] - p.real_p) > 1e-6):
        raise ConfigError(f"{source}: patch.real_p={p.real_p:g} (given in {cfg.given['patch.real_p']}) but patch.probs "
                          f"{p.probs} gives the full size ({R} px) probability {p.probs[p.sizes.index(R)]:g}: with "
                          f"patch.probs given, its entry for {R} px is p; change that entry, or drop patch.sizes and "
                          f"patch.probs to have p shape the default set")
    if cfg.sample.canvas and cfg.sample.canvas < cfg.data.resolution:
        raise ConfigError(f"{source}: sample.canvas: must be 0 or at least data.resolution ({cfg.data.resolution}), "
                          f"got {cfg.sample.canvas}")
    if cfg.repr.loss != "none" and getattr(cfg.network, "mask_ratio", 0) > 0:
        raise ConfigError(f"{source}: repr.loss={cfg.repr.loss} with network.mask_ratio={cfg.network.mask_ratio}: a "
                          f"block of a masked window holds only the kept tokens; turn one of them off")
    if cfg.repr.loss != "none":
        from .networks import network_blocks    # torch (seconds): a config loads and prints without it
        try:
            network_blocks(cfg.network, cfg.data.resolution, cfg.data.channels, cfg.repr.block)
        except ValueError as e:
            raise ConfigError(f"{source}: repr.block: with repr.loss={cfg.repr.loss} at {cfg.data.resolution} px: "
                              f"{e}") from None


def advice(cfg: Config) -> list[str]:
    """Settings that run but are probably not what was meant: one line each, to print at start."""
    lines = []
    o, t = cfg.optim, cfg.train
    if o.warmup_images > t.duration_images:
        lines.append(f"optim.warmup_images={o.warmup_images:,} is longer than the run (train.duration_images="
                     f"{t.duration_images:,}): the learning rate never reaches optim.lr={o.lr:g}; set "
                     f"optim.warmup_images below the duration")
    if cfg.sample.guidance != 1 and cfg.network.label_dim == 0:
        lines.append(f"sample.guidance={cfg.sample.guidance:g} has no effect: the model is unconditional "
                     f"(network.label_dim=0); guidance needs class labels")
    elif cfg.sample.guidance != 1 and cfg.network.label_dropout == 0:
        lines.append(f"sample.guidance={cfg.sample.guidance:g} with network.label_dropout=0: the model never "
                     f"learns the unconditional branch guidance mixes in; set network.label_dropout (e.g. 0.1)")
    return lines


def fill_from_data(cfg: Config, resolution: int, channels: int, num_classes: int, where: str
                   ) -> tuple[Config, list[str]]:
    """``cfg`` with data.resolution, data.channels and network.label_dim taken from the dataset at
    ``where`` unless the user gave them (``cfg.given``), and lines saying what was taken. A given
    value that contradicts the data is a ConfigError naming both."""
    given = dict(cfg.given)
    taken, notes = [], []

    def from_data(key: str, value: int, current: int) -> int:
        if key not in given:
            taken.append(f"{key}={value}" + (f" (instead of {current})" if current != value else ""))
            return value
        return current

    def contradiction(key: str, value, fact: str, fix: str):
        raise ConfigError(f"{key}={value} (given in {given[key]}) but {fact}: {fix}, or remove {key} to take "
                          f"the data's value")

    res = from_data("data.resolution", resolution, cfg.data.resolution)
    if res != resolution:
        contradiction("data.resolution", res, f"the samples in {where} are {resolution}x{resolution}",
                      f"set data.resolution={resolution}, shard the images again with --resolution {res}")
    ch = from_data("data.channels", channels, cfg.data.channels)
    if ch != channels:
        contradiction("data.channels", ch, f"the samples in {where} have {channels} channel(s)",
                      f"set data.channels={channels}")
    label_dim = from_data("network.label_dim", num_classes, cfg.network.label_dim)
    if label_dim and not num_classes:
        contradiction("network.label_dim", label_dim, f"the samples in {where} have no labels",
                      "set network.label_dim=0 (unconditional), shard a labelled dataset (class "
                      "sub-folders, or labels in the .npz)")
    if num_classes > label_dim > 0:
        contradiction("network.label_dim", label_dim, f"the samples in {where} have {num_classes} classes",
                      f"set network.label_dim={num_classes}")
    if label_dim > num_classes > 0:
        notes.append(f"network.label_dim={label_dim} (given) for {num_classes} classes in {where}: classes "
                     f"{num_classes}..{label_dim - 1} are never trained")
    if num_classes and not label_dim:
        notes.append(f"the samples in {where} have {num_classes} classes, but network.label_dim=0 (given in "
                     f"{given['network.label_dim']}): training unconditionally, without the labels")
    if taken:
        notes.insert(0, f"from {where}: " + ", ".join(taken))
    out = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, resolution=res, channels=ch),
                              network=dataclasses.replace(cfg.network, label_dim=label_dim))
    out.given = given
    validate(out, f"{where} + config")
    if resolution_from_data(out):       # validate checked it already when data.resolution was given
        check_resolution_dependent(out, f"{where} + config")
    return out, notes


# --------------------------------------------------------------------------------------------
# The reference of every key (`pdiff config`, docs/CONFIG.md), generated from the fields above

def _registries() -> dict[str, list[str]]:
    """The open sets of names, keyed by the field that takes them."""
    return {"network.arch": list(_networks()), "patch.mode": list(SCHEDULES)}


def _type_text(tp, key: str, registries: dict) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(map(str, typing.get_args(tp)))
    if key in registries:
        return " | ".join(registries[key])
    if typing.get_origin(tp) is list:
        return f"list[{_type_name(typing.get_args(tp)[0])}]"
    return _type_name(tp)


def _default_text(value) -> str:
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int) and abs(value) >= 10_000:
        return f"{value:_}"
    return str(value)


def reference_rows(cfg: Config | None = None) -> list[tuple[str, str, str, str]]:
    """(key, type or choices, default, meaning) of every config key, in declaration order; the
    network section: the keys every network shares, then each arch's own (the arches that share a
    config class together), their meaning led by "[arch]"."""
    cfg = cfg or Config()
    registries = _registries()
    NETWORKS = _networks()
    rows = []

    def walk(node, prefix: str, only=None, tag: str = ""):
        hints = typing.get_type_hints(type(node))
        for f in dataclasses.fields(node):
            value, key = getattr(node, f.name), prefix + f.name
            if only is not None and f.name not in only:
                continue
            if isinstance(value, NetworkConfig):
                walk(value, key + ".", only=common_keys())
                groups: dict[str, list[str]] = {}       # arches whose own keys read the same: one set of rows
                for arch, spec in NETWORKS.items():
                    own = [(f.name, f.metadata.get("doc"), getattr(spec.config(arch=arch), f.name))
                           for f in dataclasses.fields(spec.config) if f.name not in common_keys()]
                    groups.setdefault(repr(own), []).append(arch)
                for arches in groups.values():
                    walk(NETWORKS[arches[0]].config(arch=arches[0]), key + ".",
                         only=set(NETWORKS[arches[0]].keys()) - common_keys(), tag=f"[{', '.join(arches)}] ")
            elif dataclasses.is_dataclass(value):
                walk(value, key + ".")
            else:
                rows.append((key, _type_text(hints[f.name], key, registries), _default_text(value),
                             tag + f.metadata.get("doc", "")))
    walk(cfg, "")
    return rows


REFERENCE_HEADER = """# Config reference

Generated from the dataclasses in `pdiff/config.py` by `pdiff config --markdown` (a test keeps it
current). A config file sets keys by section (`optim: {lr: 1e-4}`) and may start from a preset
(`base: celeba64`); the command line sets them as `section.key=value`. Numbers take any float
literal (`1e-4`, `2e8`). `data.resolution`, `data.channels` and `network.label_dim` default to what
the shards' manifest says; a value you give must agree with it.

"""


def reference(markdown: bool = False, keys: list[str] = ()) -> str:
    """Every config key (or those starting with one of ``keys``): type (the choices of an
    enumeration), default and meaning; ``markdown``: docs/CONFIG.md."""
    rows = [r for r in reference_rows() if not keys or any(r[0] == k or r[0].startswith(k + ".") for k in keys)]
    if markdown:
        lines = [REFERENCE_HEADER + "| key | type | default | meaning |", "|---|---|---|---|"]
        escaped_bar = "\\|"        # a choice separator inside a table cell
        lines += [f"| `{k}` | {t.replace('|', escaped_bar)} | `{d}` | {m} |" for k, t, d, m in rows]
        return "\n".join(lines) + "\n"
    wk = max(len(r[0]) for r in rows)
    wt = max(len(r[1]) for r in rows if len(r[1]) <= 24)
    wd = max(len(r[2]) for r in rows if len(r[2]) <= 14)
    return "\n".join(f"{k:<{wk}}  {t:<{wt}}  {d:<{wd}}  {m}" for k, t, d, m in rows) + "\n"


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write ``cfg`` as YAML at ``path`` atomically (a crash leaves the old file or the new one)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(dump_yaml(cfg))
    os.replace(tmp, path)
