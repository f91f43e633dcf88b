"""`pdiff info`: parameter count and the FLOP model of the schedule's cost per image."""
import math

from pdiff.config import load_config
from pdiff.bench.flops import describe
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
