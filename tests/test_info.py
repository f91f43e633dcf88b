"""`pdiff info`: parameter count and the FLOP model of the schedule's cost per image."""
import math

from pdiff.config import load_config
from pdiff.flops import describe
from pdiff.tools.info import main


def test_info_celeba64_counts_and_cost(capsys):
    d = describe(load_config("celeba64"))
    assert d["parameters"] == 61_806_723
    f = d["forward_gflops_per_image"]
    # Convolutions dominate, so a patch of side s costs about (s/R)^2 of a full image.
    assert 0.2 < f[32] / f[64] < 0.3 and 0.05 < f[16] / f[64] < 0.08
    expect = (0.2 * 4 * f[16] + 0.3 * 2 * f[32] + 0.5 * f[64]) / (0.2 * 4 + 0.3 * 2 + 0.5) / f[64]
    assert math.isclose(d["cost_per_image_vs_full"], expect, rel_tol=1e-9)
    assert 0.33 < d["cost_per_image_vs_full"] < 0.40
    full = describe(load_config("celeba64", ["patch.mode=full"]))
    assert full["cost_per_image_vs_full"] == 1.0
    assert main(["tiny"]) == 0
    assert "expected cost per image" in capsys.readouterr().out


def test_ddpmpp64_training_flops_match_the_reference_and_the_mfu_figure(capsys):
    """DDPM++ 64x64 trains at about 250 GFLOP per full image (the issue's reference), so one H100
    at 40% MFU trains about 1,600 full images/s; pdiff info prints GFLOP per step and that figure."""
    from pdiff.flops import find_card
    d = describe(load_config("celeba64"), find_card("H100"), 0.4)
    full = d["train_gflops_per_image"][64]
    assert 240 < full < 260
    a = d["at_mfu"]
    assert a["card"] == "H100 SXM" and math.isclose(a["full_images_per_s"], 0.4 * 989.4e3 / full, rel_tol=1e-9)
    assert 1500 < a["full_images_per_s"] < 1700
    assert math.isclose(a["schedule_images_per_s"], a["full_images_per_s"] / d["cost_per_image_vs_full"], rel_tol=1e-9)
    batch = d["batch_full_images"]
    for s, mult in ((16, 4), (32, 2), (64, 1)):
        assert math.isclose(d["train_gflops_per_step"][s], batch * mult * d["train_gflops_per_image"][s], rel_tol=1e-9)
    assert main(["celeba64", "--card", "h100 pcie"]) == 0
    out = capsys.readouterr().out
    assert "GFLOP/step" in out and "on one H100 PCIe (756.5 TFLOP/s dense bf16)" in out
    assert main(["tiny", "--card", "B200"]) == 2
    assert "--card B200" in capsys.readouterr().err


def test_cards_are_found_by_the_names_torch_reports():
    from pdiff.flops import find_card
    names = {"NVIDIA H100 80GB HBM3": "H100 SXM", "NVIDIA H100 PCIe": "H100 PCIe", "NVIDIA H100 NVL": "H100 NVL",
             "NVIDIA H200": "H200", "NVIDIA H200 NVL": "H200 NVL", "NVIDIA A100-SXM4-80GB": "A100",
             "NVIDIA A100 80GB PCIe": "A100", "NVIDIA L40S": "L40S", "h100": "H100 SXM", "H100-SXM5": "H100 SXM"}
    for name, card in names.items():
        assert find_card(name).name == card, name
    for other in ("NVIDIA RTX A1000", "NVIDIA L40", "NVIDIA GeForce RTX 4090", "", None):
        assert find_card(other) is None, other


def test_flop_counter_rates_and_mfu():
    """The trainer's FLOP count: patches x FLOPs per patch of their size, over the interval's seconds;
    MFU over the peak of all devices; n/a (None) without a card; each reading starts afresh."""
    import random
    from pdiff.flops import FlopCounter, find_card
    flops = {8: random.randint(1, 10**9), 16: random.randint(1, 10**10)}
    steps = [(random.choice([8, 16]), random.randint(1, 64)) for _ in range(20)]
    seconds = random.uniform(0.5, 5)
    want = sum(flops[s] * n for s, n in steps) / seconds / 1e12
    for card, devices in ((None, 1), (find_card("A100"), 1), (find_card("H200"), 8)):
        counter = FlopCounter(flops, card, "bf16", devices)
        for s, n in steps:
            counter.add(s, n)
        got = counter.figures(seconds)
        assert math.isclose(got["tflop_per_s"], want, rel_tol=1e-12)
        assert got["mfu"] is None if card is None else math.isclose(got["mfu"], want / (card.bf16 * devices))
        assert counter.figures(seconds)["tflop_per_s"] == 0
    fp32 = FlopCounter(flops, find_card("L40S"), "fp32")
    fp32.add(8, 1)
    assert math.isclose(fp32.figures(1.0)["mfu"], flops[8] / 1e12 / 183.0)


def test_info_imagenet256_latent_states_the_published_count_and_the_label_embedding(capsys):
    d = describe(load_config("imagenet256_latent"))
    assert d["parameters_unconditional"] == 279_631_108                 # SPEC: ADM on 32x32x4 latents
    assert d["label_embedding_parameters"] == 1000 * 768                # 1000 classes -> 768-wide embedding
    assert d["parameters"] == 279_631_108 + 768_000
    assert d["schedule"]["sizes"] == [16, 32] and d["channels"] == 4 and d["resolution"] == 32
    assert main(["imagenet256_latent"]) == 0
    out = capsys.readouterr().out
    assert "280,399,108 parameters (279,631,108 unconditional + 768,000 in the 1000-class label embedding)" in out
    assert main(["tiny_latent"]) == 0
    assert "label embedding" not in capsys.readouterr().out           # unconditional: one number
