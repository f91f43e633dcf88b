"""The first hour as a user (issue #11): each likely mistake, made through the CLI as a user makes it,
gets a message that names the file, key or flag and says what to do, with the exit status a script
can test (2: a config value; 1: the data, or a flag the model or machine cannot honour), and no
traceback; the config takes what the shards know; a run says what it is doing and
what it wrote; progress shows in logs; the CLI follows the usual conventions."""
from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pdiff import cli
from pdiff.config import Config, load_config

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
NET = {"model_channels": 8, "channel_mult": [1, 2], "num_blocks": 1, "attn_resolutions": [8], "dropout": 0.0}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """24 random 16x16 grayscale images in 4 classes, as pdiff shards: what a user has after
    `pdiff shard`."""
    from pdiff.pipelines.shards import write_shards
    root = tmp_path_factory.mktemp("first_hour")
    rng = np.random.default_rng()
    np.savez(root / "digits.npz", images=rng.integers(0, 256, (24, 16, 16), dtype=np.uint8),
             labels=np.arange(24) % 4)
    write_shards(root / "digits.npz", root / "shards", max_count=8, workers=1, progress=False)
    return root / "shards"


def user_config(tmp_path: Path, data_path, name: str = "my", **sections) -> Path:
    """A config as a user writes one: a preset underneath, the data, a small network; no resolution,
    channels or classes (the shards know them)."""
    cfg = {"base": "tiny", "network": dict(NET),
           "data": {"path": str(data_path), "backend": "torch", "workers": 0},
           "optim": {"warmup_images": 16},
           "train": {"run_dir": str(tmp_path / "runs" / name), "batch": 4, "duration_images": 16,
                     "log_every_images": 8, "ckpt_every_images": 16, "snapshot_every_images": 10**9,
                     "sample_every_images": 10**9},
           "sample": {"steps": 2}}
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run(capsys, *argv) -> tuple[int, str, str]:
    """`pdiff ARGV...` in this process, as the console script runs it: (exit status, stdout, stderr)."""
    capsys.readouterr()
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture
def small_runs(one_thread):
    """In-process training on one thread, with the default umask of a shared machine."""
    before = os.umask(0o022)
    yield
    os.umask(before)


# ---------------------------------------------------------------------------------------------
# 1. Numbers

def test_float_fields_take_any_float_literal_and_ints_take_integral_ones(tmp_path, shards, capsys):
    """PyYAML reads 1e-4 as a string: every spelling of a number is a number in the config."""
    path = tmp_path / "my.yaml"
    path.write_text(f"base: tiny\ndata: {{path: {shards}}}\noptim: {{lr: 1e-4, eps: 1E-9}}\n"
                    f"train: {{duration_images: 2e8}}\n")
    rc, out, err = run(capsys, "train", "--config", path, "--dry-run")
    assert rc == 0, err
    printed = yaml.safe_load(out)            # the plan lines are YAML comments
    assert printed["optim"]["lr"] == 1e-4 and printed["optim"]["eps"] == 1e-9
    assert printed["train"]["duration_images"] == 200_000_000
    for text in ("1e-4", "1E-4", "1e-04", "+1.0e-4"):
        rc, out, err = run(capsys, "train", "--config", "tiny", "--dry-run", f"optim.lr={text}", "train.batch=6.4e1",
                           f"data.path={shards}")
        assert rc == 0, (text, err)
        assert yaml.safe_load(out)["optim"]["lr"] == 1e-4 and yaml.safe_load(out)["train"]["batch"] == 64
    rc, _, err = run(capsys, "train", "--config", "tiny", "--dry-run", "train.batch=2.5")
    assert rc == 2 and "train.batch: expected an integer, got 2.5" in err
    rc, _, err = run(capsys, "train", "--config", "tiny", "--dry-run", "optim.lr=fast")
    assert rc == 2 and "optim.lr: expected a number, got 'fast'" in err


# ---------------------------------------------------------------------------------------------
# 2. What the shards know

def test_resolution_channels_and_classes_come_from_the_shards(tmp_path, shards, capsys):
    rc, out, err = run(capsys, "train", "--config", user_config(tmp_path, shards), "--dry-run")
    assert rc == 0, err
    printed = yaml.safe_load(out)
    assert (printed["data"]["resolution"], printed["data"]["channels"], printed["network"]["label_dim"]) == (16, 1, 4)
    assert (f"# from {shards}: data.resolution=16 (instead of 32), data.channels=1 (instead of 3), "
            f"network.label_dim=4 (instead of 0)") in out
    assert "8px p=0.50" in out and "16px p=0.50" in out          # the schedule of the shards' R ({R/2, R} below 64 px)
    rc, out, err = run(capsys, "info", user_config(tmp_path, shards))
    assert rc == 0 and "ddpmpp at 16x16x1" in out and "network.label_dim=4" in err


def test_a_given_value_that_contradicts_the_shards_names_both(tmp_path, shards, capsys):
    mine = user_config(tmp_path, shards, data={"channels": 3})
    rc, _, err = run(capsys, "train", "--config", mine)
    assert rc == 2, err
    assert f"data.channels=3 (given in {mine}) but the samples in {shards} have 1 channel(s)" in err
    assert "set data.channels=1" in err and "remove data.channels" in err
    rc, _, err = run(capsys, "train", "--config", user_config(tmp_path, shards), "data.resolution=32")
    assert rc == 2 and "data.resolution=32 (given in the command line)" in err and "are 16x16" in err
    assert "--resolution 32" in err                              # or shard the images again at 32
    assert not (tmp_path / "runs").exists()                      # nothing was created


def test_labelled_shards_trained_unconditionally_say_so_once(tmp_path, shards, capsys, small_runs):
    rc, _, err = run(capsys, "train", "--config", user_config(tmp_path, shards), "--device", "cpu",
                     "network.label_dim=0")
    assert rc == 0, err
    note = (f"the samples in {shards} have 4 classes, but network.label_dim=0 (given in the command line): "
            f"training unconditionally, without the labels")
    assert err.count(note) == 1, err
    assert load_config(tmp_path / "runs" / "my" / "config.yaml").network.label_dim == 0


# ---------------------------------------------------------------------------------------------
# 3. Settings that cannot work or do not do what they say

def test_patch_sizes_without_probs_is_a_message_even_in_a_dry_run(tmp_path, shards, capsys):
    for extra in ([], ["--dry-run"]):
        rc, _, err = run(capsys, "train", "--config", user_config(tmp_path, shards), "patch.sizes=[8,16]", *extra)
        assert rc == 2, err
        assert "patch.sizes [8, 16] is given without patch.probs" in err and "patch.probs=[0.5,0.5]" in err
    rc, _, err = run(capsys, "train", "--config", "tiny", "--dry-run", "patch.sizes=[12,32]", "patch.probs=[0.5,0.5]")
    assert rc == 2 and "patch.sizes: 12 does not divide data.resolution 32" in err


def test_a_given_p_that_explicit_probs_contradict_is_a_message(tmp_path, shards, capsys):
    rng = np.random.default_rng()
    full = float(rng.choice([0.3, 0.6, 0.7]))
    probs = f"patch.probs=[{1 - full:g},{full:g}]"
    rc, _, err = run(capsys, "train", "--config", "tiny", "--dry-run", "patch.sizes=[16,32]", probs, "patch.real_p=0.5")
    assert rc == 2 and f"patch.real_p=0.5 (given in the command line) but patch.probs [{1 - full:g}, {full:g}] gives " \
                       f"the full size (32 px) probability {full:g}" in err, err
    for agreeing in (["patch.real_p=" + f"{full:g}"], []):       # p agrees with the probs, or is not given
        rc, out, err = run(capsys, "train", "--config", "tiny", "--dry-run", "patch.sizes=[8,16]", probs, *agreeing,
                           f"data.path={shards}")
        assert rc == 0 and f"16px p={full:.2f}" in out, err


def test_a_warmup_longer_than_the_run_is_reported(tmp_path, shards, capsys, small_runs):
    mine = user_config(tmp_path, shards, optim={"warmup_images": 10_000})
    message = ("optim.warmup_images=10,000 is longer than the run (train.duration_images=16): the learning "
               "rate never reaches optim.lr=0.001")
    rc, out, _ = run(capsys, "train", "--config", mine, "--dry-run")
    assert rc == 0 and message in out
    rc, _, err = run(capsys, "train", "--config", mine, "--device", "cpu")
    assert rc == 0 and err.count(message) == 1


# ---------------------------------------------------------------------------------------------
# 4. The reference of every key

def all_keys(node, prefix=""):
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        yield from all_keys(value, f"{prefix}{f.name}.") if dataclasses.is_dataclass(value) else [prefix + f.name]


def test_pdiff_config_lists_every_key_with_type_default_and_meaning(capsys):
    rc, out, _ = run(capsys, "config")
    assert rc == 0
    lines = {line.split()[0]: line for line in out.splitlines()}
    for key in all_keys(Config()):
        assert key in lines, key
        assert len(re.split(r"\s{2,}", lines[key].strip())) == 4, lines[key]     # key, type, default, meaning
    assert re.search(r"^data\.backend\s+auto \| dali \| torch\s+\"auto\"\s+\S", lines["data.backend"])
    assert "ddpmpp | ncsnpp | adm" in lines["network.arch"] and "stochastic | progressive | full" in lines["patch.mode"]
    assert "10_000_000" in lines["optim.warmup_images"] and "rises linearly" in lines["optim.warmup_images"]
    rc, out, _ = run(capsys, "config", "optim")
    assert rc == 0 and out.splitlines()[0].startswith("optim.lr") and "train." not in out
    rc, _, err = run(capsys, "config", "optimizer")
    assert rc == 2 and "'optimizer' is neither a section nor a key" in err
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--help"])
    assert e.value.code == 0 and "pdiff config" in capsys.readouterr().out


def test_docs_config_md_is_the_generated_reference(capsys):
    rc, out, _ = run(capsys, "config", "--markdown")
    assert rc == 0
    assert (REPO / "docs" / "CONFIG.md").read_text() == out, \
        "docs/CONFIG.md is out of date: regenerate it with `pdiff config --markdown > docs/CONFIG.md`"


# ---------------------------------------------------------------------------------------------
# 5. Pointing at the wrong thing

def test_data_path_at_the_image_folder_says_to_shard_it(tmp_path, capsys):
    from PIL import Image
    photos = tmp_path / "photos" / "cats"
    photos.mkdir(parents=True)
    for i in range(3):
        Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(photos / f"{i}.jpg")
    rc, _, err = run(capsys, "train", "--config", user_config(tmp_path, photos.parent), "--device", "cpu")
    assert rc == 1, err
    assert f"{photos.parent} holds images, not shards" in err
    assert f"pdiff shard {photos.parent} shards/photos" in err and "data.path=shards/photos" in err
    assert "re-run the same" not in err and not (tmp_path / "runs").exists()


def test_empty_or_wrong_data_path_messages(tmp_path, shards, capsys):
    rc, _, err = run(capsys, "train", "--config", user_config(tmp_path, ""))
    assert rc == 1 and "data.path is empty: set it to a folder written by `pdiff shard`" in err
    (tmp_path / "nothing").mkdir()
    rc, _, err = run(capsys, "train", "--config", user_config(tmp_path, tmp_path / "nothing"))
    assert rc == 1 and f"{tmp_path / 'nothing'} is an empty folder" in err
    npz = shards.parent / "digits.npz"
    rc, _, err = run(capsys, "train", "--config", user_config(tmp_path, npz))
    assert rc == 1 and f"{npz} is a .npz file, not a folder of shards" in err and f"pdiff shard {npz}" in err
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------------------------------------
# 6 and 3. Sampling: a folder for --snapshot, flags the model cannot honour

@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    """A run folder holding two snapshots of an unconditional model."""
    from pdiff.model import build_model
    from pdiff.snapshot import save_snapshot
    root = tmp_path_factory.mktemp("sample_run")
    cfg = load_config("tiny", [f"network.{k}={v}".replace(" ", "") for k, v in NET.items()]
                      + ["data.resolution=16", "data.channels=1", "sample.steps=2"])
    for images in (80, 160):
        save_snapshot(root / "run" / "snapshots" / f"ema-{images:012d}.safetensors", build_model(cfg), cfg, images)
    return root / "run"


def test_sample_takes_the_newest_snapshot_of_a_run_folder(run_folder, tmp_path, capsys):
    newest = run_folder / "snapshots" / "ema-000000000160.safetensors"
    for folder in (run_folder, run_folder / "snapshots"):
        rc, out, err = run(capsys, "sample", "--snapshot", folder, "--seeds", "0-1", "--npz", tmp_path / "a.npz",
                           "--device", "cpu", "--no-progress")
        assert rc == 0, err
        assert f"the newest snapshot in {folder}: {newest}" in err and str(newest) in out
    rc, _, err = run(capsys, "sample", "--snapshot", newest, "--seeds", "0-1", "--npz", tmp_path / "b.npz",
                     "--device", "cpu", "--no-progress")
    assert rc == 0 and np.array_equal(np.load(tmp_path / "a.npz")["images"], np.load(tmp_path / "b.npz")["images"])
    (tmp_path / "empty").mkdir()
    rc, _, err = run(capsys, "sample", "--snapshot", tmp_path / "empty", "--grid", tmp_path / "g.png", "--device",
                     "cpu")
    assert rc == 2 and "no snapshot (*.safetensors)" in err and "RUN/snapshots/ema-<images>.safetensors" in err


@pytest.mark.parametrize("flags, message", [
    (["--class", "3"], "--class 3: the model is unconditional (network.label_dim=0 in its config); leave --class out"),
    (["--guidance", "2"], "--guidance 2: classifier-free guidance needs a class-conditional model"),
    (["--device", "cuda:99"], "--device cuda:99: "),
])
def test_sample_flags_the_model_or_machine_cannot_honour(run_folder, tmp_path, capsys, flags, message):
    rc, _, err = run(capsys, "sample", "--snapshot", run_folder, "--seeds", "0", "--grid", tmp_path / "g.png",
                     "--no-progress", *(flags if "--device" in flags else flags + ["--device", "cpu"]))
    assert rc == 1 and message in err, err
    assert not (tmp_path / "g.png").exists()


def test_device_cuda_on_a_cpu_only_torch_is_a_message(run_folder, tmp_path, capsys):
    rc, _, err = run(capsys, "sample", "--snapshot", run_folder, "--seeds", "0", "--grid", tmp_path / "g.png",
                     "--device", "cuda", "--no-progress")
    if torch.cuda.is_available():          # a GPU machine: the flag is honoured
        assert rc == 0, err
        return
    assert rc == 1 and "_cuda_setDevice" not in err, err
    assert "--device cuda:0: " in err and "use --device cpu" in err


# ---------------------------------------------------------------------------------------------
# 8. Progress in logs

@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory):
    """A file of TF-FID Inception weights (random ones: these tests check plumbing, not numbers)."""
    from pdiff import fid as F
    path = tmp_path_factory.mktemp("inception") / "random_inception.pth"
    torch.save(F.load_inception(random_init=True).state_dict(), path)
    return path


def test_progress_lines_when_stderr_is_not_a_terminal(run_folder, tmp_path, shards, capsys, monkeypatch, small_runs):
    monkeypatch.setenv("PDIFF_PROGRESS_SECONDS", "0")
    rc, _, err = run(capsys, "sample", "--snapshot", run_folder, "--seeds", "0-5", "--batch", "2",
                     "--npz", tmp_path / "s.npz", "--device", "cpu")
    assert rc == 0, err
    lines = [line for line in err.splitlines() if line.startswith("sample: ")]
    assert [line.split()[1] for line in lines] == ["0/6", "2/6", "4/6", "6/6", "6/6"], err   # start, 3 batches, end
    assert "img/s" in lines[1] and "ETA" in lines[1] and "ETA" not in lines[-1] and "\r" not in err
    # the trainer: a line while no log line is due (a long train.log_every_images)
    rc, _, err = run(capsys, "train", "--config", user_config(tmp_path, shards, train={"log_every_images": 10**6}),
                     "--device", "cpu")
    assert rc == 0, err
    beats = [line for line in err.splitlines() if "img/s on average in this run" in line]
    assert beats and all(re.match(r"\[\s*\d+\.\d%\]\s+\d+ img", line) for line in beats), err


def test_fid_progress_lines(tmp_path, shards, capsys, monkeypatch, inception_weights):
    monkeypatch.setenv("PDIFF_PROGRESS_SECONDS", "0")
    rc, out, err = run(capsys, "fid", "ref", "--data", shards, "--max-images", "6", "--out", tmp_path / "ref.npz",
                       "--inception", inception_weights, "--fid-batch", "3", "--device", "cpu")
    assert rc == 0, err
    lines = [line for line in err.splitlines() if line.startswith("features: ")]
    assert [line.split()[1] for line in lines] == ["0/6", "3/6", "6/6", "6/6"], err


# ---------------------------------------------------------------------------------------------
# 10, 11, 12. The run says what it does and what it wrote; pauses are timed on their own

def test_end_of_training_is_announced_and_summarised(tmp_path, shards, capsys, small_runs):
    mine = user_config(tmp_path, shards, train={"sample_every_images": 10**9})
    rc, _, err = run(capsys, "train", "--config", mine, "--device", "cpu")
    assert rc == 0, err
    runs = tmp_path / "runs" / "my"
    (checkpoint,) = (runs / "checkpoints").glob("ckpt-*")     # the last step may end past 16 images
    n = int(checkpoint.name.split("-")[1])
    snapshot = runs / "snapshots" / f"ema-{n:012d}.safetensors"
    for line in (f"reached {n:,} images: writing the last checkpoint, snapshot and sample grid",
                 f"snapshot {snapshot} (", f"sample grid {runs / 'samples' / f'samples-{n:012d}.png'} (",
                 f"checkpoint {checkpoint} (", f"{n:,} images seen ({n:,} in this run, ",
                 f"last snapshot    {snapshot}", f"last checkpoint  {checkpoint}"):
        assert line in err, (line, err)
    command = re.search(r"sample with\s+(pdiff sample .*)$", err, re.M).group(1).split()
    assert command[:4] == ["pdiff", "sample", "--snapshot", str(snapshot)]
    rc, _, err2 = run(capsys, *[a if a != "grid.png" else tmp_path / "grid.png" for a in command[1:]],
                      "--device", "cpu", "--no-progress")
    assert rc == 0 and (tmp_path / "grid.png").exists(), err2
    for path in (snapshot, checkpoint / "state.pt", runs / "config.yaml", runs / "log.jsonl"):
        assert path.stat().st_mode & 0o777 == 0o644, path    # others on the cluster can read them
    # The console line never passes 100% though the last step ends beyond the duration.
    percents = [float(m) for m in re.findall(r"^\[\s*([\d.]+)%\]", err, re.M)]
    assert percents and max(percents) == 100.0


def test_a_wall_clock_stop_also_writes_a_snapshot(tmp_path, shards, capsys, small_runs):
    mine = user_config(tmp_path, shards, train={"duration_images": 10**6, "wall_budget_s": 1e-3})
    rc, _, err = run(capsys, "train", "--config", mine, "--device", "cpu")
    assert rc == 0, err
    snaps = list((tmp_path / "runs" / "my" / "snapshots").glob("ema-*.safetensors"))
    ckpts = list((tmp_path / "runs" / "my" / "checkpoints").glob("ckpt-*"))
    assert len(snaps) == 1 and len(ckpts) == 1 and snaps[0].stem.split("-")[1] == ckpts[0].name.split("-")[1]
    assert "wall-clock budget: stopped at" in err and "run the same command to resume" in err
    assert f"last snapshot    {snaps[0]}" in err and f"pdiff sample --snapshot {snaps[0]}" in err


def test_time_spent_on_grids_and_checkpoints_is_not_counted_in_images_per_s(tmp_path, shards, capsys, small_runs):
    """A sample grid of many steps in the middle of the run: its seconds are logged as sample_s in the
    next row, and that row's images/s covers only the rest of the interval's wall time."""
    mine = user_config(tmp_path, shards, train={"duration_images": 40, "log_every_images": 8,
                                                "sample_every_images": 16, "ckpt_every_images": 16},
                       sample={"steps": 12})
    rc, _, err = run(capsys, "train", "--config", mine, "--device", "cpu")
    assert rc == 0, err
    rows = [yaml.safe_load(line) for line in (tmp_path / "runs" / "my" / "log.jsonl").read_text().splitlines()]
    paused = [r for r in rows if r.get("sample_s", 0) > 0]
    assert paused and all(r.get("checkpoint_s", 0) > 0 for r in paused)
    for prev, row in zip(rows, rows[1:]):
        wall = row["time"] - prev["time"]
        images = row["images_seen"] - prev["images_seen"]
        pauses = sum(row.get(f"{what}_s", 0.0) for what in ("snapshot", "sample", "fid", "checkpoint"))
        active = images / row["images_per_s"]
        assert abs(active + pauses - wall) < 0.05 + 0.05 * wall, (row, wall)


def test_eta_takes_the_nearer_of_the_duration_and_the_wall_clock_budget(tmp_path):
    from pdiff.monitor import Monitor
    now = time.time()
    mon = Monitor(tmp_path, False, total_images=10**9, start_images=0, wall_budget_s=20 * 60, started=now - 60)
    mon.t0 = now - 10                        # 10 images in 10 s: 1e9 images would take 31 years
    assert 18 * 60 <= mon.eta_seconds(10) <= 19 * 60
    mon = Monitor(tmp_path, False, total_images=100, start_images=0, wall_budget_s=20 * 60, started=now)
    mon.t0 = now - 10
    assert 8 <= mon.eta_seconds(50) <= 11   # 50 more images at 5 img/s: sooner than the budget


# ---------------------------------------------------------------------------------------------
# 15. CLI conventions

def test_cli_conventions(capsys):
    rc, out, err = run(capsys)
    assert rc == 2 and err.startswith("usage: pdiff COMMAND") and "config" in err
    rc, out, _ = run(capsys, "--version")
    assert rc == 0 and re.match(r"pdiff \d+\.\d+\.\d+ \(torch \d", out)

    def help_of(*argv) -> str:
        with pytest.raises(SystemExit) as e:
            cli.main(list(argv) + ["--help"])
        assert e.value.code == 0, argv
        return capsys.readouterr().out
    for sub in ("verify", "info"):
        text = help_of("shard", sub)
        assert text.startswith(f"usage: pdiff shard {sub} [-h]") and "folder" in text.splitlines()[0], text
    from pdiff.tools import info
    assert " ".join(info.__doc__.split()) in " ".join(help_of("info").split())     # the whole description
    sample = help_of("sample")
    assert "ema-000200000000.safetensors" in sample and "snapshot-0" not in sample
    assert re.search(r"--grid-count GRID_COUNT\s+seeds in the grid \(the first ones\) \(default: 64\)", sample)
    gen = help_of("fid", "gen")
    assert re.search(r"--ref REF\s+reference statistics", gen)
    assert "(default: stop)" in help_of("shard").replace("\n", " ").replace("  ", " ")
    assert "(default: auto)" in help_of("train")


@pytest.mark.parametrize("argv", [["shard", "info", "{shards}"], ["shard", "verify", "{shards}", "--workers", "1"],
                                  ["config"], ["shard", "{npz}", "{out}", "--workers", "1"]])
def test_a_reader_that_closed_the_pipe_ends_the_command_quietly(tmp_path, shards, argv):
    """`pdiff shard info DIR | head` (issue 23): a reader that has gone ends any subcommand without a
    traceback, with the status a shell reports for SIGPIPE. The pipe's read end is closed before the
    command starts, so its first write meets a closed pipe however fast it runs; the shard writer's
    progress goes to stderr, so there both go to the pipe (as with 2>&1 | head)."""
    np.savez(tmp_path / "d.npz", images=np.random.default_rng().integers(0, 256, (4, 16, 16), dtype=np.uint8))
    args = [a.format(shards=shards, npz=tmp_path / "d.npz", out=tmp_path / "out") for a in argv]
    read_end, write_end = os.pipe()
    os.close(read_end)
    both = "{npz}" in argv          # the writer: its stdout and stderr both to the closed pipe
    with open(tmp_path / "stderr", "w") as err:
        p = subprocess.run([PY, "-m", "pdiff.cli", *args], stdout=write_end, stderr=write_end if both else err,
                           env={**os.environ, "PDIFF_PROGRESS_SECONDS": "0"}, timeout=300)
    os.close(write_end)
    err = (tmp_path / "stderr").read_text()
    assert p.returncode == 141 and "Traceback" not in err and "Exception ignored" not in err, err


# ---------------------------------------------------------------------------------------------
# 16. The Inception weights: fetched once into the cache, used from there; offline, what to fetch

def test_fid_keeps_the_inception_weights_in_the_cache(tmp_path, capsys, monkeypatch, inception_weights):
    from pdiff import fid as F
    cache = tmp_path / "cache"
    monkeypatch.setenv("PDIFF_CACHE", str(cache))
    rng = np.random.default_rng()
    np.savez(tmp_path / "imgs.npz", images=rng.integers(0, 256, (3, 16, 16, 3), dtype=np.uint8))
    F.save_stats(tmp_path / "ref.npz", np.zeros(2048), np.eye(2048), 3, 16)
    calc = ["fid", "calc", "--images", tmp_path / "imgs.npz", "--ref", tmp_path / "ref.npz", "--device", "cpu",
            "--no-progress"]
    fetched = []

    def offline(url, dest):
        fetched.append(url)
        raise OSError("Network is unreachable")
    monkeypatch.setattr(F, "_fetch", offline)
    rc, _, err = run(capsys, *calc)
    assert rc == 2 and fetched == [F.FID_WEIGHTS_URL]
    assert f"curl -L -o pt_inception-2015-12-05-6726825d.pth {F.FID_WEIGHTS_URL}" in err
    assert f"put the file at {cache / 'pt_inception-2015-12-05-6726825d.pth'}" in err
    assert "Network is unreachable" in err

    weights = inception_weights

    def online(url, dest):                  # the network, served from a local file
        fetched.append(url)
        dest.write_bytes(weights.read_bytes())
    monkeypatch.setattr(F, "_fetch", online)
    rc, out, err = run(capsys, *calc)
    assert rc == 0 and "FID" in out, err
    assert F.resolve_weights() == cache / "pt_inception-2015-12-05-6726825d.pth"      # from now on, the cache
    assert fetched == [F.FID_WEIGHTS_URL] * 2       # the failed try, then one download
    assert (cache / "pt_inception-2015-12-05-6726825d.pth").read_bytes() == weights.read_bytes()
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]      # no partial download left

    monkeypatch.undo()                      # the real fetch, of a file:// URL: no network needed
    monkeypatch.setenv("PDIFF_CACHE", str(cache))
    path = F.resolve_weights(weights.as_uri())
    assert path == cache / weights.name and path.read_bytes() == weights.read_bytes()


# ---------------------------------------------------------------------------------------------
# 17. Packaging: the torch floor, DALI for CUDA 12 and 13, no Triton needed to train

def test_dependencies_name_what_the_code_needs():
    text = (REPO / "pyproject.toml").read_text()
    assert re.search(r'"torch>=2\.(\d+)', text).group(1) >= "6"          # torch.library.triton_op
    assert re.search(r'^dali-cuda12 = \["nvidia-dali-cuda120', text, re.M)
    assert re.search(r'^dali-cuda13 = \["nvidia-dali-cuda130', text, re.M)


@pytest.mark.slow
def test_training_without_triton_uses_the_torch_kernels(tmp_path, shards, capsys, monkeypatch):
    """`import triton` fails (as on a machine without it): the trainer imports, and trains."""
    blocker = tmp_path / "no_triton"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(
        "import sys\n"
        "class NoTriton:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'triton' or name.startswith('triton.'):\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, NoTriton())\n")
    script = ("import sys\n"
              "try:\n    import triton\nexcept ImportError:\n    pass\n"
              "else:\n    sys.exit('the blocker let triton in')\n"
              "from pdiff.cli import main\nsys.exit(main(sys.argv[1:]))\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{blocker}{os.pathsep}{REPO}"}
    p = subprocess.run([PY, "-c", script, "train", "--config", str(user_config(tmp_path, shards)), "--device", "cpu"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr
    assert list((tmp_path / "runs" / "my" / "checkpoints").glob("ckpt-*/COMPLETE"))
    # Asking for the Triton kernels there: the config says what is missing.
    import pdiff.kernels
    monkeypatch.setattr(pdiff.kernels, "triton_available", lambda: False)
    rc, _, err = run(capsys, "train", "--config", user_config(tmp_path, shards), "train.kernels=triton")
    assert rc == 2 and "train.kernels: triton, but Triton cannot be imported here" in err


# ---------------------------------------------------------------------------------------------
# 18. Outputs others can read (snapshots were written 0600)

@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_snapshots_are_readable_as_the_umask_allows(tmp_path, run_folder, umask, mode):
    from pdiff.snapshot import load_snapshot, save_snapshot
    model, cfg, _ = load_snapshot(run_folder)
    before = os.umask(umask)
    try:
        path = save_snapshot(tmp_path / "s.safetensors", model, cfg, 5)
    finally:
        os.umask(before)
    assert path.stat().st_mode & 0o777 == mode
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.safetensors", "s.safetensors.sha256"]  # no temp file left
    assert (tmp_path / "s.safetensors.sha256").stat().st_mode & 0o777 == mode


# ---------------------------------------------------------------------------------------------
# Issue #23: the first hour again

@pytest.fixture(scope="module")
def folder_shards(tmp_path_factory):
    """Images in two class folders (cat, dog), as pdiff shards: the classes have names."""
    from PIL import Image
    from pdiff.pipelines.shards import write_shards
    root = tmp_path_factory.mktemp("folders")
    rng = np.random.default_rng()
    for name in ("cat", "dog"):
        (root / "photos" / name).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)).save(root / "photos" / name / f"{i}.png")
    write_shards(root / "photos", root / "shards", workers=1, progress=False)
    return root / "shards"


def test_dry_run_checks_what_the_run_checks_before_its_first_step(tmp_path, shards, capsys):
    rc, out, err = run(capsys, "train", "--config", "tiny", "--dry-run")
    assert rc == 1 and "data.path is empty: set it to a folder written by `pdiff shard`" in err and not out
    mine = user_config(tmp_path, shards)
    rc, _, err = run(capsys, "train", "--config", mine, "--dry-run", "--device", "cuda")
    if not torch.cuda.is_available():
        assert rc == 1 and "--device cuda:0: " in err and "use --device cpu" in err, err
    # Patch sizes the network cannot take (a U-Net of 3 levels halves twice: sizes must be multiples of 4).
    deep = ["network.channel_mult=[1,2,2]", "network.attn_resolutions=[]", "patch.sizes=[2,16]",
            "patch.probs=[0.5,0.5]"]
    for extra in (["--dry-run"], ["--device", "cpu"]):
        rc, _, err = run(capsys, "train", "--config", mine, *deep, *extra)
        assert rc == 2 and "patch sizes [2] are not multiples of the ddpmpp network's downsampling factor 4" in err, err
        assert "Traceback" not in err
    assert not (tmp_path / "runs").exists()


def test_class_folders_make_a_conditional_model_and_the_start_lines_say_so(tmp_path, folder_shards, shards, capsys):
    line = ("2 classes from the folder names (cat, dog): training class-conditional; network.label_dim=0 "
            "for unconditional")
    rc, out, err = run(capsys, "train", "--config", user_config(tmp_path, folder_shards), "--dry-run")
    assert rc == 0 and f"# {line}" in out, out
    rc, out, _ = run(capsys, "train", "--config", user_config(tmp_path, shards), "--dry-run")     # labels of an .npz
    assert rc == 0 and f"4 classes in the labels of {shards}: training class-conditional" in out
    rc, out, _ = run(capsys, "train", "--config", user_config(tmp_path, folder_shards), "--dry-run",
                     "network.label_dim=0")
    assert rc == 0 and "training class-conditional" not in out


def test_sample_of_a_run_folder_takes_the_average_the_run_uses(tmp_path, capsys):
    """A power-EMA run writes one snapshot per sigma_rel at each count; `--snapshot RUN` takes
    ema.stds[0]'s (the run's own sample grids and FID use it), whichever file was written last."""
    from pdiff.ema import build_ema, save_snapshots
    from pdiff.model import build_model
    rng = np.random.default_rng()
    stds = [float(s) for s in rng.choice([0.05, 0.08, 0.1, 0.12], size=2, replace=False)]
    cfg = load_config("tiny", [f"network.{k}={v}".replace(" ", "") for k, v in NET.items()]
                      + ["data.resolution=16", "data.channels=1", "sample.steps=2", "ema.mode=power",
                         f"ema.stds=[{stds[0]},{stds[1]}]"])
    ema = build_ema(cfg, build_model(cfg), 4)
    paths = save_snapshots(ema, tmp_path / "run" / "snapshots", cfg, 64)
    os.utime(paths[0], (time.time() - 60, time.time() - 60))     # written before the others, as a run does
    rc, _, err = run(capsys, "sample", "--snapshot", tmp_path / "run", "--seeds", "0", "--npz", tmp_path / "a.npz",
                     "--device", "cpu", "--no-progress")
    assert rc == 0 and f"the newest snapshot in {tmp_path / 'run'}: {paths[0]}" in err, err


def conditional_snapshot(folder: Path, data_path, label_dropout: float) -> Path:
    from pdiff.model import build_model
    from pdiff.snapshot import save_snapshot
    cfg = load_config("tiny", [f"network.{k}={v}".replace(" ", "") for k, v in NET.items()]
                      + ["data.resolution=16", "data.channels=1", "sample.steps=2", "network.label_dim=2",
                         f"network.label_dropout={label_dropout}", f"data.path={data_path}"])
    return save_snapshot(folder / "ema-000000000064.safetensors", build_model(cfg), cfg, 64)


def test_sample_class_by_name_and_guidance_without_label_dropout(tmp_path, folder_shards, capsys):
    snap = conditional_snapshot(tmp_path, folder_shards, 0.0)
    common = ["sample", "--snapshot", snap, "--seeds", "0-1", "--device", "cpu", "--no-progress"]
    rc, _, err = run(capsys, *common, "--class", "dog", "--npz", tmp_path / "by_name.npz")
    assert rc == 0, err
    rc, _, err = run(capsys, *common, "--class", "1", "--npz", tmp_path / "by_number.npz")
    assert rc == 0, err
    assert np.array_equal(np.load(tmp_path / "by_name.npz")["images"], np.load(tmp_path / "by_number.npz")["images"])
    assert list(np.load(tmp_path / "by_name.npz")["labels"]) == [1, 1]
    rc, _, err = run(capsys, *common, "--class", "cow", "--npz", tmp_path / "x.npz")
    assert rc == 1 and "--class cow: not a class of the run's shards" in err and "0=cat, 1=dog" in err, err
    rc, _, err = run(capsys, *common, "--guidance", "2", "--npz", tmp_path / "g.npz")
    assert rc == 0 and "WARNING --guidance 2: the model was trained without label dropout" in err, err
    dropped = conditional_snapshot(tmp_path / "dropped", folder_shards, 0.1)
    rc, _, err = run(capsys, "sample", "--snapshot", dropped, "--seeds", "0", "--device", "cpu", "--no-progress",
                     "--guidance", "2", "--npz", tmp_path / "h.npz")
    assert rc == 0 and "WARNING" not in err, err


def test_the_sample_grid_announces_itself_and_can_be_switched_off(tmp_path, shards, capsys, small_runs):
    for every, grids in ((0, 0), (-1, 1)):
        mine = user_config(tmp_path, shards, name=f"grid{every}", train={"sample_every_images": every,
                                                                         "duration_images": 24})
        rc, _, err = run(capsys, "train", "--config", mine, "--device", "cpu")
        assert rc == 0, err
        written = list((tmp_path / "runs" / f"grid{every}").glob("samples/*.png"))
        assert len(written) == grids, err
        if grids:
            announced = err.index(f"sampling a grid of 36 images (3 network evaluations each) on cpu for "
                                  f"{written[0].name}; train.sample_every_images=0 turns grids off")
            assert announced < err.index(f"sample grid {written[0]} (")
        else:
            assert "sampling a grid" not in err and "sample grid" not in err
    rc, _, err = run(capsys, "train", "--config", "tiny", "--dry-run", "train.sample_every_images=-2")
    assert rc == 2 and "(-1 = at the end only, 0 = never)" in err


def test_one_cli_convention(tmp_path, shards, capsys):
    mine = user_config(tmp_path, shards)
    rc, out, _ = run(capsys, "info", "--config", mine, "train.batch=8")       # as every other subcommand takes it
    assert rc == 0 and "ddpmpp at 16x16x1" in out and "train.batch=8" in out
    rc, out2, _ = run(capsys, "info", mine, "train.batch=8")
    assert rc == 0 and out2 == out
    # --device takes the same values everywhere: cuda:N in train as in sample
    rc, _, err = run(capsys, "train", "--config", mine, "--dry-run", "--device", "cuda:7")
    assert "invalid choice" not in err and (rc == 1 and "--device cuda:7: " in err or torch.cuda.device_count() > 7)
    rc, _, err = run(capsys, "train", "--config", mine, "--dry-run", "--device", "tpu")
    assert rc == 1 and "--device tpu: not a device name; use auto, cpu, cuda or cuda:N" in err
    # overrides before and after the flags
    rc, _, err = run(capsys, "train", "--config", mine, "train.batch=8", "--dry-run", "optim.lr=1e-4")
    assert rc == 0, err
    rc, _, err = run(capsys, "train", "--config", mine, "--dry-run", "patch.sizes=8,16")
    assert rc == 2 and "patch.sizes: expected a list of int, got '8,16'; write a list in brackets, e.g. " \
                       "patch.sizes=[8,16,32]" in err, err
    for wrong, right in (("optim.learning_rate", "optim.lr"), ("train.batch_size", "train.batch"),
                         ("train.lr", "optim.lr"), ("optim.warmup_imgs", "optim.warmup_images"),
                         ("optimizer.lr", "optim")):
        rc, _, err = run(capsys, "train", "--config", mine, "--dry-run", f"{wrong}=1")
        assert rc == 2 and f"did you mean {right!r}?" in err, (wrong, err)
    from pdiff.tools.bench import KINDS
    top = cli.usage()
    assert all(kind in top for kind in KINDS), top


def test_readme_error_examples_match_what_is_printed(tmp_path, capsys):
    """Each message the troubleshooting (docs/runs.md) quotes for a trainer is what the trainer prints (the
    folder names as the README's user has them)."""
    from PIL import Image
    def words(text: str) -> str:
        return " ".join(text.split())
    readme = (REPO / "docs" / "runs.md").read_text()       # README links its troubleshooting there
    blocks, block = [], None
    for line in readme.splitlines():
        if line.strip().startswith("```"):
            block = [] if block is None else blocks.append(" ".join(block))
        elif block is not None:
            block.append(line)
    quoted = [words(b) for b in blocks if b.strip().startswith("pdiff train: ")]
    os.chdir(tmp_path)
    try:
        (tmp_path / "photos").mkdir()
        for i in range(4):
            Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "photos" / f"{i}.png")
        from pdiff.pipelines.shards import write_shards
        write_shards(Path("photos"), Path("shards/photos"), workers=1, progress=False)
        (tmp_path / "my.yaml").write_text("base: tiny\ndata: {path: shards/photos, resolution: 64}\n")
        printed = []
        for argv in (["--config", "tiny", "data.path=photos"], ["--config", "my.yaml"],
                     ["--config", "tiny", "data.path=shards/photos", "patch.sizes=[8,16,32]"]):
            rc, _, err = run(capsys, "train", *argv, "--dry-run")
            assert rc != 0, err
            printed.append(words(err))
    finally:
        os.chdir(REPO)
    for message in printed:        # the README wraps long messages where the terminal does not
        assert any(message == q for q in quoted), (message, quoted)
