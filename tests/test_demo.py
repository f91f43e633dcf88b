"""`make demo`'s path, shortened: digits -> pdiff shard -> train (DALI where installed) -> grids."""
import json

from PIL import Image

from pdiff.demo import main


def test_demo_end_to_end_short(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["--out", str(out), "train.duration_images=256", "train.log_every_images=128",
                 "train.snapshot_every_images=256", "train.sample_every_images=256", "sample.steps=3"]) == 0
    printed = capsys.readouterr().out
    assert str((out / "samples.png").resolve()) in printed
    grid = Image.open(out / "samples.png")      # a row of 8 per digit: the model is conditional
    assert grid.size == ((16 * 8 + 7) * 4, (16 * 10 + 9) * 4)
    assert Image.open(out / "data.png").size == grid.size
    manifest = json.loads((out / "shards" / "manifest.json").read_text())
    assert manifest["count"] == 1797 and manifest["channels"] == 1 and manifest["resolution"] == 16
    assert list((out / "run" / "checkpoints").glob("ckpt-*/COMPLETE"))
