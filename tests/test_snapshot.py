"""EMA snapshots and training checkpoints read back for sampling."""
import json

import pytest
import torch

from pdiff.config import load_config, to_dict
from pdiff.model import build_model
from pdiff.snapshot import (SnapshotError, find_checkpoint, load_checkpoint, load_model,
                            load_snapshot, save_snapshot)

SMALL = ["network.model_channels=16", "network.channel_mult=[1,2]", "network.attn_resolutions=[]",
         "data.resolution=16"]


def small_cfg(extra=()):
    return load_config("tiny", SMALL + list(extra))


def randomized(model):
    """Fresh random values everywhere (a freshly built net has zero-initialised output layers)."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.05)
    return model


def test_snapshot_roundtrip(tmp_path):
    torch.manual_seed(int(torch.randint(0, 2**31, ())))
    cfg = small_cfg(["network.label_dim=3"])
    model = randomized(build_model(cfg)).train()
    path = save_snapshot(tmp_path / "snaps" / "snapshot-000001000.safetensors", model, cfg, 1000)
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name, path.name + ".sha256"]  # no temp file left
    loaded, cfg2, meta = load_snapshot(path)
    assert cfg2 == cfg and meta["images_seen"] == "1000" and meta["format"] == "pdiff-snapshot-1"
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    # same function: the loaded denoiser gives the original's output
    x = torch.randn(2, 3, 16, 16)
    sigma = torch.tensor([0.3, 7.0])
    coords = torch.rand(2, 2, 16, 16) * 2 - 1
    labels = torch.eye(3)[[0, 2]]
    model.eval()
    with torch.no_grad():
        assert torch.allclose(loaded(x, sigma, coords, labels), model(x, sigma, coords, labels), atol=1e-6)


def test_snapshot_errors(tmp_path):
    from safetensors.torch import save_file
    with pytest.raises(SnapshotError, match="does not exist"):
        load_snapshot(tmp_path / "missing.safetensors")
    save_file({"w": torch.zeros(2)}, str(tmp_path / "foreign.safetensors"), metadata={"format": "pt"})
    with pytest.raises(SnapshotError, match="not a pdiff snapshot"):
        load_snapshot(tmp_path / "foreign.safetensors")
    (tmp_path / "garbage.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(SnapshotError, match="not a readable safetensors"):
        load_snapshot(tmp_path / "garbage.safetensors")
    # weights of one network under the config of another
    cfg = small_cfg()
    model = build_model(cfg)
    bigger = small_cfg(["network.model_channels=24"])
    from safetensors.torch import save_file as save
    save({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "mismatch.safetensors"),
         metadata={"format": "pdiff-snapshot-1", "config": json.dumps(to_dict(bigger)), "images_seen": "0"})
    with pytest.raises(SnapshotError, match="do not fit the network"):
        load_snapshot(tmp_path / "mismatch.safetensors")
    bad = to_dict(cfg)
    bad["network"]["no_such_key"] = 1
    save({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "badcfg.safetensors"),
         metadata={"format": "pdiff-snapshot-1", "config": json.dumps(bad), "images_seen": "0"})
    with pytest.raises(SnapshotError, match="no_such_key"):
        load_snapshot(tmp_path / "badcfg.safetensors")


def write_checkpoint(run, images, cfg, complete=True):
    d = run / "checkpoints" / f"ckpt-{images:012d}"
    d.mkdir(parents=True)
    model, ema = randomized(build_model(cfg)), randomized(build_model(cfg))
    torch.save({"model": model.state_dict(), "ema": ema.state_dict(), "config": to_dict(cfg),
                "images_seen": images}, d / "state.pt")
    if complete:
        (d / "COMPLETE").write_text("")
    return d, model, ema


def test_checkpoint_newest_complete_with_ema_weights(tmp_path):
    torch.manual_seed(int(torch.randint(0, 2**31, ())))
    cfg = small_cfg()
    run = tmp_path / "run"
    old, _, old_ema = write_checkpoint(run, 2000, cfg)
    write_checkpoint(run, 900, cfg)
    newest_incomplete, _, _ = write_checkpoint(run, 10_000, cfg, complete=False)
    assert find_checkpoint(run) == old  # numeric order of images seen; unfinished ones skipped
    model, cfg2, meta = load_model(checkpoint=run)
    assert cfg2 == cfg and meta["images_seen"] == "2000" and meta["weights"] == "ema"
    for k, v in old_ema.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    raw, _, _ = load_checkpoint(old, weights="model")
    assert not all(torch.equal(raw.state_dict()[k], v) for k, v in old_ema.state_dict().items())
    assert find_checkpoint(old / "state.pt") == old
    # keys of a compiled / DDP-wrapped model still load
    wrapped = {f"module._orig_mod.{k}": v for k, v in old_ema.state_dict().items()}
    torch.save({"ema": wrapped, "config": to_dict(cfg), "images_seen": 5}, old / "state.pt")
    model, _, _ = load_checkpoint(old)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in old_ema.state_dict().items())
    with pytest.raises(SnapshotError, match="no 'model' entry"):
        load_checkpoint(old, weights="model")
    with pytest.raises(SnapshotError, match="no COMPLETE marker"):
        find_checkpoint(newest_incomplete)
    with pytest.raises(SnapshotError, match="no complete checkpoint"):
        find_checkpoint(tmp_path)
    with pytest.raises(SnapshotError, match="exactly one"):
        load_model()
