"""network.arch=edm2 and EDM2's training dynamics: magnitude-preserving layers keep unit magnitude,
forced weight normalization holds after optimizer steps, the presets' parameter counts equal EDM2's
(networks_edm2.py's structure, counted here), the learned loss weighting and the inverse-sqrt
learning rate against hand-computed values, per-patch-size noise distributions, the per-network
config (keys of another arch, old flat configs, block names), and a compiled edm2 run over three
patch sizes with no recompiles after warm-up. The kill -9 resume of an edm2 run is in test_train.py
(test_kill9_and_rerun_matches_uninterrupted_run[edm2])."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from pdiff.config import ConfigError, Config, from_dict, load_config, to_dict
from pdiff.loss import Uncertainty, learned_weighting, noise_distribution
from pdiff.model import build_model, count_parameters
from pdiff.networks import NETWORKS, build_network, network_config
from pdiff.networks.edm2 import Block, MPConv, MPFourier, force_weight_norm_, mp_cat, mp_silu, mp_sum, normalize
from pdiff.step import build_step, learning_rate, synthetic_patches
from test_train import log_rows, final_state, run_train, write_config


def rms(x: torch.Tensor) -> float:
    return float(x.detach().double().square().mean().sqrt())


# ---------------------------------------------------------------------------------------------
# Magnitude preservation. Tolerances: 2% for the element-wise operations on 2^20 unit-normal
# samples (the standard error of an rms estimate there is ~0.07%), 5% for MPFourier and MPConv
# (fewer independent outputs), 15% for a whole block (its branches are not independent).

def test_elementwise_mp_operations_keep_unit_magnitude():
    n = 1 << 20
    a, b = torch.randn(n), torch.randn(n)
    assert abs(rms(mp_silu(a)) - 1) < 0.02
    for t in (0.3, 0.5, 0.8):
        assert abs(rms(mp_sum(a, b, t)) - 1) < 0.02
    x, y = torch.randn(4096, 16, 4, 4), torch.randn(4096, 48, 4, 4)
    for t in (0.3, 0.5):
        out = mp_cat(x, y, t=t)
        assert out.shape[1] == 64 and abs(rms(out) - 1) < 0.02
    # normalize: unit rms per sample whatever the input's scale, up to its eps (1e-4 of a unit rms)
    z = torch.randn(8, 32, 5, 5) * (1 + torch.rand(8, 1, 1, 1) * 50)
    assert torch.allclose(normalize(z).square().mean(dim=(1, 2, 3)).sqrt(), torch.ones(8), atol=2e-4)


def test_mp_fourier_and_mpconv_keep_unit_magnitude():
    torch.manual_seed(torch.seed() % 2**31)
    fourier = MPFourier(1024)
    assert abs(rms(fourier(torch.randn(512))) - 1) < 0.05
    # MPConv at gain 1, from weights of any scale: unit-magnitude input -> unit-magnitude output
    linear = MPConv(256, 512)
    conv = MPConv(64, 96, (3, 3))
    with torch.no_grad():
        linear.weight.mul_(7.0)
        conv.weight.mul_(0.01)
    assert abs(rms(linear(torch.randn(2048, 256))) - 1) < 0.05
    out = conv(torch.randn(64, 64, 12, 12))
    assert abs(rms(out[:, :, 1:-1, 1:-1]) - 1) < 0.05       # the zero-padded border is lower, by design
    assert abs(rms(conv(torch.randn(64, 64, 12, 12), gain=3.0)[:, :, 1:-1, 1:-1]) - 3) < 0.15


@pytest.mark.parametrize("flavor, resample, attention", [("enc", "keep", True), ("enc", "down", False),
                                                          ("dec", "up", True)])
def test_a_block_keeps_unit_magnitude_at_init(flavor, resample, attention):
    block = Block(64, 128, 256, flavor, resample, attention=attention, channels_per_head=32)
    x = torch.randn(16, 64, 16, 16)
    y = block(x, mp_silu(torch.randn(16, 256)))
    assert abs(rms(y) - 1) < 0.15, rms(y)


# ---------------------------------------------------------------------------------------------
# Forced weight normalization

# normalize's eps (1e-4, EDM2's) leaves a unit-norm weight's rms at 1 - 1e-4
NORM_TOL = 2e-4


def unit_rows(module) -> list[float]:
    """Largest deviation from 1 of each MPConv's per-output-channel rms."""
    return [float((m.weight.double().flatten(1).square().mean(1).sqrt() - 1).abs().max())
            for m in module.modules() if isinstance(m, MPConv)]


def test_forced_weight_normalization_holds_after_optimizer_steps(tmp_path):
    cfg = load_config("tiny_edm2", ["data.resolution=16", "train.batch=4", "patch.sizes=[8, 16]",
                                    "patch.probs=[0.5, 0.5]", "optim.warmup_images=1", "optim.lr=0.2",
                                    "train.compile=false"])
    step = build_step(cfg, "cpu")
    assert max(unit_rows(step.model)) < NORM_TOL          # from the start
    before = {k: v.clone() for k, v in step.model.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    for i, size in enumerate([8, 16, 8]):
        n = step.schedule.batch_for(size)
        patches = synthetic_patches(n, 3, size, torch.uint8, "cpu", g)
        sigma = torch.rand(n, generator=g) * 3 + 0.1
        loss = step.loss(patches, torch.zeros(n, 2, dtype=torch.long), sigma,
                         torch.randn(n, 3, size, size, generator=g), None, 0, i)
        loss.mean().backward()
        step.optimizer.step()
        drift = max(unit_rows(step.model))
        step.after_optimizer_step()
        assert drift > 10 * NORM_TOL                     # the step moved the norms ...
        assert max(unit_rows(step.model)) < NORM_TOL     # ... and they are back at 1
        step.optimizer.zero_grad(set_to_none=True)
    changed = [k for k, v in step.model.state_dict().items() if not torch.equal(v, before[k])]
    assert any("weight" in k for k in changed)
    # a network without MP layers is left alone
    ddpm = build_network(network_config("ddpmpp", model_channels=8, channel_mult=[1], num_blocks=1,
                                        attn_resolutions=[]), 8, 1)
    state = {k: v.clone() for k, v in ddpm.state_dict().items()}
    assert force_weight_norm_(ddpm) == 0 and all(torch.equal(v, state[k]) for k, v in ddpm.state_dict().items())


# ---------------------------------------------------------------------------------------------
# Parameter counts against EDM2's

def edm2_reference_count(img_resolution, img_channels, label_dim, model_channels, channel_mult, num_blocks,
                         attn_resolutions, extra_inputs=2, channels_per_head=64, logvar_channels=128) -> int:
    """Parameters of networks_edm2.py's Precond (UNet + logvar head), counted from its structure:
    ``extra_inputs`` more input channels (pdiff's coordinates) beside its image and constant."""
    widths = [model_channels * m for m in channel_mult]
    emb = max(widths)

    def mpconv(cin, cout, k=1):
        return cout * cin * k * k

    def block(cin, cout, flavor, attention):
        n = 1 + mpconv(cout if flavor == "enc" else cin, cout, 3) + mpconv(emb, cout) + mpconv(cout, cout, 3)
        n += mpconv(cin, cout) if cin != cout else 0
        if attention and cout // channels_per_head:
            n += mpconv(cout, 3 * cout) + mpconv(cout, cout)
        return n

    total = 1 + mpconv(widths[0], emb) + (mpconv(label_dim, emb) if label_dim else 0)     # out_gain, embeddings
    skips, cout = [], img_channels + 1 + extra_inputs
    for level, ch in enumerate(widths):
        res = img_resolution >> level
        if level == 0:
            total, cout = total + mpconv(cout, ch, 3), ch
        else:
            total += block(cout, cout, "enc", False)
        skips.append(cout)
        for _ in range(num_blocks):
            total, cout = total + block(cout, ch, "enc", res in attn_resolutions), ch
            skips.append(cout)
    for level, ch in reversed(list(enumerate(widths))):
        res = img_resolution >> level
        if level == len(widths) - 1:
            total += block(cout, cout, "dec", True) + block(cout, cout, "dec", False)
        else:
            total += block(cout, cout, "dec", False)
        for _ in range(num_blocks + 1):
            total, cout = total + block(cout + skips.pop(), ch, "dec", res in attn_resolutions), ch
    return total + mpconv(cout, img_channels, 3) + mpconv(logvar_channels, 1)


@pytest.mark.parametrize("preset, published_millions", [("edm2_img64_s", 280), ("edm2_img512_xs", 125),
                                                         ("edm2_img512_s", 280)])
def test_preset_parameter_counts_equal_edm2s(preset, published_millions):
    cfg = load_config(preset)
    n = cfg.network
    with torch.device("meta"):
        model = build_model(cfg)
    expected = edm2_reference_count(cfg.data.resolution, cfg.data.channels, n.label_dim, n.model_channels,
                                    n.channel_mult, n.num_blocks, n.attn_resolutions)
    assert count_parameters(model) == expected
    # the paper's table (its sizes are conditional ImageNet networks, rounded to 1M; XS: 124.7M)
    assert abs(expected / 1e6 - published_millions) < 0.5


# ---------------------------------------------------------------------------------------------
# Learned weighting and the inverse-sqrt learning rate

def test_learned_weighting_against_hand_computed_values():
    loss, u = torch.tensor([0.5, 2.0, 1.0]), torch.tensor([0.0, math.log(2.0), -1.0])
    expected = torch.tensor([0.5, 1.0 + math.log(2.0), math.e - 1.0])
    torch.testing.assert_close(learned_weighting(loss, u), expected)
    # its gradient in u is 1 - L exp(-u): zero where exp(u) equals the loss (EDM2's fixed point)
    u = u.clone().requires_grad_(True)
    learned_weighting(loss, u).sum().backward()
    torch.testing.assert_close(u.grad, 1 - loss * torch.exp(-u.detach()))
    # u(sigma) is EDM2's logvar head: MPFourier features of c_noise through one normalized linear
    head = Uncertainty(16)
    c = torch.randn(5)
    feats = torch.cos(c[:, None] * head.fourier.freqs + head.fourier.phases) * math.sqrt(2)
    w = head.linear.weight / head.linear.weight.norm(dim=1, keepdim=True)
    torch.testing.assert_close(head(c), (feats @ w.t()).reshape(-1), rtol=1e-4, atol=1e-4)


def test_patch_loss_with_learned_weighting_is_the_edm_loss_reweighted():
    base = ["data.resolution=16", "train.batch=4", "patch.sizes=[8, 16]", "patch.probs=[0.5, 0.5]",
            "train.compile=false", "train.kernels=torch"]
    learned = build_step(load_config("tiny_edm2", base + ["loss.weighting=learned"]), "cpu")
    plain = build_step(load_config("tiny_edm2", base + ["loss.weighting=edm"]), "cpu")
    assert learned.model.logvar is not None and plain.model.logvar is None
    plain.model.net.load_state_dict(learned.model.net.state_dict())
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    patches = synthetic_patches(6, 3, 8, torch.uint8, "cpu", g)
    sigma, noise = torch.rand(6, generator=g) * 5 + 0.05, torch.randn(6, 3, 8, 8, generator=g)
    args = (patches, torch.zeros(6, 2, dtype=torch.long), sigma, noise, None, 0, 0)
    edm = plain.loss(*args)
    u = learned.model.logvar(sigma.log() / 4)
    torch.testing.assert_close(learned.loss(*args), edm / u.exp() + u, rtol=1e-5, atol=1e-6)


def test_inv_sqrt_learning_rate_against_hand_computed_values():
    o = load_config("edm2_img512_s").optim          # ref_lr 0.01, ref 143,360,000 images, warm-up 10M
    assert (o.schedule, o.betas) == ("inv_sqrt", [0.9, 0.99])
    assert learning_rate(o, 5_000_000) == pytest.approx(0.01 * 0.5)
    assert learning_rate(o, 100_000_000) == pytest.approx(0.01)
    assert learning_rate(o, 4 * 143_360_000) == pytest.approx(0.01 / 2)
    assert learning_rate(o, 9 * 143_360_000) == pytest.approx(0.01 / 3)
    warm = dataclasses.replace(o, schedule="warmup")
    assert learning_rate(warm, 9 * 143_360_000) == pytest.approx(0.01)


# ---------------------------------------------------------------------------------------------
# Per-patch-size noise distributions

def test_per_patch_size_noise_distribution():
    cfg = load_config("tiny", ["patch.sizes=[8, 16, 32]", "patch.probs=[0.2, 0.3, 0.5]",
                               "patch.p_mean=[-0.4, -0.8, -1.2]", "patch.p_std=[1.0, 1.2, 1.6]"])
    assert [noise_distribution(cfg, s) for s in (8, 16, 32)] == [(-0.4, 1.0), (-0.8, 1.2), (-1.2, 1.6)]
    default = load_config("tiny")
    assert noise_distribution(default, 16) == (default.loss.p_mean, default.loss.p_std)
    with pytest.raises(ConfigError, match=r"patch.p_mean: \[-0.4\]: give one value per patch size"):
        load_config("tiny", ["patch.sizes=[16, 32]", "patch.probs=[0.5, 0.5]", "patch.p_mean=[-0.4]"])
    with pytest.raises(ConfigError, match="patch.p_std"):
        load_config("tiny", ["patch.sizes=[16, 32]", "patch.probs=[0.5, 0.5]", "patch.p_std=[1.0, -1.0]"])


# ---------------------------------------------------------------------------------------------
# The per-network config

def test_network_section_takes_the_keys_of_its_arch(tmp_path):
    cfg = load_config("tiny_edm2")
    assert type(cfg.network) is NETWORKS["edm2"].config and cfg.network.model_channels == 32
    # a key of another arch names the arch and the arches that have it
    with pytest.raises(ConfigError, match=r"network.label_balance: not a key of network.arch=ddpmpp "
                                          r"\(it is a key of network.arch=edm2\)"):
        load_config("tiny", ["network.label_balance=0.3"])
    with pytest.raises(ConfigError, match="network.num_layers: not a key of network.arch=edm2 .no network has it"):
        load_config("tiny_edm2", ["network.num_layers=4"])
    # switching arch on top of a preset keeps the shared keys and takes the new arch's defaults
    switched = load_config("tiny", ["network.arch=edm2", "network.label_dropout=0.1"])
    assert switched.network.channel_mult == [1, 2, 3, 4] and switched.network.label_dropout == 0.1
    # round trip through the dict checkpoints and snapshots store
    assert from_dict(to_dict(cfg)) == cfg
    # an old flat config (every key the one NetworkConfig had) still loads for the U-Nets
    flat = to_dict(load_config("tiny"))
    assert set(flat["network"]) == {"arch", "model_channels", "channel_mult", "num_blocks", "attn_resolutions",
                                    "dropout", "label_dim", "label_dropout", "coord_embed", "coord_freqs"}
    for arch in ("ncsnpp", "adm"):
        assert from_dict({**flat, "network": {**flat["network"], "arch": arch}}).network.arch == arch
    # a network section that does not match its arch is refused, naming the fix
    bad = Config()
    bad.network.arch = "edm2"
    from pdiff.config import validate
    with pytest.raises(ConfigError, match="network_config"):
        validate(bad)


@pytest.mark.parametrize("arch", ["ddpmpp", "ncsnpp", "adm", "edm2"])
def test_every_network_names_its_blocks_for_hooks(arch):
    net = build_network(network_config(arch, model_channels=16, channel_mult=[1, 2], num_blocks=1,
                                       attn_resolutions=[8]), 16, 3)
    names = net.block_names()
    assert names[0].startswith("enc.") and names[-1].startswith("dec.") and "dec.8x8_in0" in names
    seen = {}
    hooks = [net.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: seen.update({n: o.shape}))
             for n in names]
    x = torch.cat([torch.randn(2, 3, 8, 8), torch.zeros(2, 2, 8, 8)], dim=1)
    net(x, torch.zeros(2))
    for h in hooks:
        h.remove()
    assert list(seen) == names                       # all ran, in forward order
    assert seen["dec.8x8_in0"][2:] == (4, 4)         # the 8x8 level of a 16 px network on an 8 px patch


# ---------------------------------------------------------------------------------------------
# Training runs on the demo's data (scikit-learn digits through `pdiff shard`, the demo fixture)

EDM2_RUN = dict(network={"arch": "edm2", "model_channels": 8, "channel_mult": [1, 2], "num_blocks": 1,
                         "attn_resolutions": [8], "dropout": 0.0, "label_dim": 0},
                loss={"weighting": "learned"},
                optim={"lr": 1e-2, "schedule": "inv_sqrt", "ref_images": 96, "warmup_images": 32,
                       "betas": [0.9, 0.99]},
                patch={"sizes": [4, 8, 16], "probs": [0.2, 0.3, 0.5], "p_mean": [-0.4, -0.8, -1.2],
                       "p_std": [1.0, 1.2, 1.4]})


def test_tiny_edm2_trains_on_the_demo_data(tmp_path, digits_shards):
    from pdiff.train import train
    cfg = load_config("tiny_edm2", [f"data.path={digits_shards}", "data.backend=torch", "data.workers=0",
                                    f"train.run_dir={tmp_path / 'run'}", "train.batch=8",
                                    "train.duration_images=256", "train.log_every_images=64",
                                    "train.ckpt_every_images=256", "train.snapshot_every_images=256",
                                    "train.sample_every_images=100000", "sample.steps=2",
                                    "optim.warmup_images=32", "optim.ref_images=64"])
    assert train(cfg, "cpu") == 0
    rows = log_rows(tmp_path / "run")
    assert rows[-1]["images_seen"] >= 256 and all(math.isfinite(r["loss"]) for r in rows)
    for r in rows:      # the logged learning rate is the inv_sqrt schedule's at the step's images
        assert r["lr"] == pytest.approx(cfg.optim.lr / math.sqrt(max(r["images_seen"] / 64, 1)), rel=1e-9)
    state = final_state(tmp_path / "run")["model"]
    assert any(k.startswith("logvar.") for k in state)
    model = build_model(load_config(tmp_path / "run" / "config.yaml"))     # completed from the data (16x16x1)
    model.load_state_dict(state)
    assert max(unit_rows(model)) < NORM_TOL       # the trained weights are normalized as saved
    assert list((tmp_path / "run" / "snapshots").glob("ema-*.safetensors"))   # power EMAs (the preset's)


def test_compiled_edm2_over_three_patch_sizes_has_no_recompiles(tmp_path, digits_shards):
    cfg = write_config(tmp_path, digits_shards, **{k: dict(v) for k, v in EDM2_RUN.items()},
                       train={"compile": True, "compile_backend": "aot_eager", "duration_images": 192,
                              "log_every_images": 64})
    # aot_eager: dynamo traces and guards exactly as with inductor (recompiles are dynamo's), without
    # inductor's code generation, which takes many minutes for EDM2's six graphs on 2 CPU cores.
    run_train(cfg, timeout=900)
    rows = log_rows(tmp_path / "run")
    assert {k for r in rows for k in r if k.startswith("loss_patch/")} == {"loss_patch/4", "loss_patch/8",
                                                                         "loss_patch/16"}
    assert [r["recompiles_after_warmup"] for r in rows] == [0] * len(rows)
