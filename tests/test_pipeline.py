"""The patch pipeline, both backends: patches equal the source at their offsets, batch sizes follow
the schedule, offsets reach both ends, W ranks read the rows of one process, resume is exact."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pdiff.config import load_config
from pdiff.schedule import StochasticSchedule
from pdiff.pipelines import PipelineStateError, build_pipeline, dali_available
from pdiff.pipelines.order import SamplePlan, crop_positions, epoch_permutation, rank_stream
from pdiff.pipelines.shards import ShardError, write_shards
from pdiff.pipelines.shards.options import write_order
from pdiff.pipelines.sample_source import SourceError

BACKENDS = ["torch", pytest.param("dali", marks=pytest.mark.skipif(not dali_available(),
                                                                    reason="NVIDIA DALI is not installed"))]
R = 16


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """37 random RGB 16x16 images with labels, as PNG shards and as raw shards."""
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng()
    images = rng.integers(0, 256, (37, R, R, 3), dtype=np.uint8)
    labels = rng.integers(0, 5, 37)
    np.savez(root / "d.npz", images=images, labels=labels)
    for enc in ("png", "raw"):
        write_shards(root / "d.npz", root / enc, workers=1, encoding=enc, max_count=10, progress=False)
    order = write_order(37, 0)                  # sample k of the shards is input order[k]
    return root, images[order], labels[order]


def make(root, enc, backend, batch=4, world=1, rank=0, seed=None, workers=0, xflip=False, sizes=(4, 8, 16),
         probs=(0.4, 0.3, 0.3), cache="none", device="cpu"):
    seed = int(np.random.default_rng().integers(1 << 30)) if seed is None else seed
    cfg = load_config(None, [f"data.path={root / enc}", f"data.resolution={R}", "data.channels=3",
                             f"data.backend={backend}", f"data.workers={workers}", f"train.batch={batch}",
                             f"train.seed={seed}", f"data.xflip={str(xflip).lower()}", f"data.cache={cache}"])
    sch = StochasticSchedule(R, batch, sizes=list(sizes), probs=list(probs), seed=seed)
    return build_pipeline(cfg, sch, rank=rank, world_size=world, device=torch.device(device)), sch, cfg


def expected_patch(images, index, x0, y0, s, flip=False):
    """The uint8 (s, s, C) region of the (mirrored) source image the patch must equal, pixel for pixel."""
    img = images[index][:, ::-1] if flip else images[index]
    return torch.from_numpy(np.ascontiguousarray(img[y0:y0 + s, x0:x0 + s]))


def float_as_before(patches_u8):
    """The float32 CHW patches the pipelines delivered before they handed over uint8: a lookup table
    of (v - 127.5) * float32(1 / 127.5), the same bits in numpy, torch and DALI."""
    lut = (np.arange(256, dtype=np.float32) - np.float32(127.5)) * np.float32(1 / 127.5)
    return torch.from_numpy(lut[patches_u8.numpy().transpose(0, 3, 1, 2)])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("enc", ["png", "raw"])
def test_patches_equal_source_at_offsets(dataset, backend, enc):
    root, images, labels = dataset
    pipe, sch, cfg = make(root, enc, backend, world=2, rank=1)
    assert pipe.backend == backend and pipe.source.count == 37
    plan = SamplePlan(37, labels, sch, cfg.train.seed, 1, 2)
    seen = 0
    sizes = set()
    for _ in range(8):
        b = next(pipe)
        step = plan.step(seen)
        assert b.images_seen == seen and b.patch_size == sch.size_at(seen) == step.patch_size
        s = b.patch_size
        sizes.add(s)
        n = sch.batch_for(s) // 2
        assert b.patches.shape == (n, s, s, 3) and b.patches.dtype == torch.uint8     # HWC, as decoded
        assert b.offsets.shape == (n, 2) and b.offsets.dtype == torch.int64 and b.labels.dtype == torch.int64
        np.testing.assert_array_equal(b.labels.numpy(), labels[step.indices])
        for j in range(n):
            x0, y0 = b.offsets[j].tolist()
            assert 0 <= x0 <= R - s and 0 <= y0 <= R - s
            assert torch.equal(b.patches[j], expected_patch(images, step.indices[j], x0, y0, s))
        assert torch.equal(b.float_patches(), float_as_before(b.patches))
        seen += sch.batch_for(s)
    pipe.close()
    assert len(sizes) >= 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_xflip_patches_are_regions_of_the_mirrored_image(dataset, backend):
    root, images, labels = dataset
    pipe, sch, cfg = make(root, "png", backend, xflip=True)
    plan = SamplePlan(37, labels, sch, cfg.train.seed, 0, 1, xflip=True)
    flipped_any = False
    for _ in range(3):
        b = next(pipe)
        step = plan.step(b.images_seen)
        for j in range(len(b.labels)):
            x0, y0 = b.offsets[j].tolist()
            flipped_any |= bool(step.flips[j])
            assert torch.equal(b.patches[j], expected_patch(images, step.indices[j], x0, y0, b.patch_size,
                                                            flip=bool(step.flips[j])))
    assert flipped_any
    pipe.close()


def test_offsets_uniform_over_all_valid_positions_both_ends():
    rng = np.random.default_rng()
    seed = int(rng.integers(1 << 30))
    for s, r in ((4, 16), (7, 10), (16, 16)):
        n = r - s + 1
        offs = np.concatenate([crop_positions(seed, k * 64, 64, s, r)[0] for k in range(200)])
        assert offs.min() == 0 and offs.max() == r - s
        for axis in (0, 1):
            counts = np.bincount(offs[:, axis], minlength=n)
            assert len(counts) == n
            expected = len(offs) / n            # every position, the ends included, equally often
            assert np.all(np.abs(counts - expected) < 5 * np.sqrt(expected) + 1), counts
    a = crop_positions(seed, 128, 10, 4, 16)[0]
    np.testing.assert_array_equal(a, crop_positions(seed, 128, 10, 4, 16)[0])      # a pure function
    assert not np.array_equal(a, crop_positions(seed, 192, 10, 4, 16)[0])         # steps crop differently


@pytest.mark.parametrize("n,world", [(30, 3), (31, 3), (37, 4), (5, 2)])
def test_ranks_read_the_rows_of_one_process_whatever_the_world_size(n, world):
    """Interleaving the W ranks' steps (rows r, r+W, ...) gives the one-process step, sample for sample
    and crop for crop, also when W does not divide the dataset size; so a run can resume on another
    number of processes. The one-process stream visits every sample once per epoch."""
    rng = np.random.default_rng()
    seed = int(rng.integers(1 << 30))
    sch = StochasticSchedule(R, world * int(rng.integers(1, 4)), sizes=[4, 8, 16], probs=[0.3, 0.3, 0.4], seed=seed)
    labels = rng.integers(0, 10, n)
    one = SamplePlan(n, labels, sch, seed, 0, 1, xflip=True)
    ranks = [SamplePlan(n, labels, sch, seed, r, world, xflip=True) for r in range(world)]
    seen, images_seen, per_rank = [], 0, [[] for _ in range(world)]
    while len(seen) < 3 * n:                             # crosses two epoch boundaries
        want = one.step(images_seen)
        got = [p.step(images_seen) for p in ranks]
        for r, g in enumerate(got):
            per_rank[r] += g.indices.tolist()
        for field in ("indices", "offsets", "flips", "labels"):
            merged = np.empty_like(getattr(want, field))
            for r, g in enumerate(got):
                assert g.patch_size == want.patch_size
                merged[r::world] = getattr(g, field)
            np.testing.assert_array_equal(merged, getattr(want, field), err_msg=field)
        seen += want.indices.tolist()
        images_seen += sch.batch_for(want.patch_size)
    for epoch in range(3):
        assert sorted(seen[epoch * n:(epoch + 1) * n]) == list(range(n))
    np.testing.assert_array_equal(seen[:n], epoch_permutation(n, seed, 0))
    if n >= 10:                     # epochs differ (two of 5 samples' 120 orders coincide one time in 120)
        assert seen[:n] != seen[n:2 * n]
    for r in range(world):              # the rank's own stream (the object-storage prefetcher reads it ahead)
        assert per_rank[r] == rank_stream(n, seed, r, world, 0, len(per_rank[r])).tolist()


@pytest.mark.parametrize("backend", BACKENDS)
def test_ranks_share_sizes_and_split_samples(dataset, backend):
    root, images, labels = dataset
    seed = int(np.random.default_rng().integers(1 << 30))
    # 36 images per epoch across 2 ranks... use 37 images: each rank reads 19 per epoch
    pipes = [make(root, "raw", backend, batch=2, world=2, rank=r, seed=seed, sizes=(8, 16), probs=(0.5, 0.5))[0]
             for r in range(2)]
    plans = [SamplePlan(37, labels, p.schedule, seed, r, 2) for r, p in enumerate(pipes)]
    seen_idx = [[], []]
    for _ in range(6):
        b0, b1 = next(pipes[0]), next(pipes[1])
        assert b0.patch_size == b1.patch_size and b0.images_seen == b1.images_seen
        assert b0.patches.shape == b1.patches.shape == (pipes[0].schedule.batch_for(b0.patch_size) // 2,
                                                        b0.patch_size, b0.patch_size, 3)
        for r in range(2):
            seen_idx[r] += plans[r].step(b0.images_seen).indices.tolist()
    for p in pipes:
        p.close()
    k = min(len(seen_idx[0]), 18)                                   # within the first epoch
    assert not set(seen_idx[0][:k]) & set(seen_idx[1][:k])


@pytest.mark.parametrize("backend", BACKENDS)
def test_resume_gives_identical_batches(dataset, backend, tmp_path):
    root, images, labels = dataset
    seed = int(np.random.default_rng().integers(1 << 30))
    ref, _, _ = make(root, "png", backend, seed=seed)
    ref_batches = [next(ref) for _ in range(12)]               # crosses epoch boundaries (37 images)
    ref.close()
    run, _, _ = make(root, "png", backend, seed=seed)
    for _ in range(7):
        next(run)
    torch.save(run.state_dict(), tmp_path / "state.pt")
    run.close()
    resumed, _, _ = make(root, "png", backend, seed=seed)
    next(resumed)                                               # a pipeline already running can be reset
    resumed.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    for want in ref_batches[7:]:
        got = next(resumed)
        assert got.patch_size == want.patch_size and got.images_seen == want.images_seen
        assert torch.equal(got.patches, want.patches) and torch.equal(got.offsets, want.offsets)
        assert torch.equal(got.labels, want.labels)
    resumed.close()


@pytest.mark.parametrize("before,after", [(1, 2), (2, 1)])
def test_states_of_w_ranks_resume_on_another_number_of_ranks(dataset, before, after):
    """Elastic resume of the data: the states W ranks saved (as a checkpoint holds them) give W' ranks
    the rows an uninterrupted one-process pipeline reads next, patch for patch; the damaged samples any
    rank had met are known to every new rank, and their replacements are counted once."""
    root, _, _ = dataset
    seed = int(np.random.default_rng().integers(1 << 30))
    ref, _, _ = make(root, "raw", "torch", batch=4, seed=seed, xflip=True)
    want = [next(ref) for _ in range(9)]                  # crosses an epoch boundary (37 images)
    ref.close()
    old = [make(root, "raw", "torch", batch=4, world=before, rank=r, seed=seed, xflip=True)[0] for r in range(before)]
    for _ in range(4):
        for p in old:
            next(p)
    for r, p in enumerate(old):
        p.corrupt.found, p.corrupt.replaced = {3 + r}, 1 + r     # as if each had met a damaged sample
    states = [p.state_dict() for p in old]
    for p in old:
        p.close()
    new = [make(root, "raw", "torch", batch=4, world=after, rank=r, seed=seed, xflip=True)[0] for r in range(after)]
    for p in new:
        p.load_state_dict(p.regroup_states(states))
    assert all(p.corrupt.found == set(range(3, 3 + before)) for p in new)
    assert sum(p.corrupt.replaced for p in new) == sum(range(1, before + 1))
    for w in want[4:]:
        got = [next(p) for p in new]
        assert all(g.images_seen == w.images_seen and g.patch_size == w.patch_size for g in got)
        for r, g in enumerate(got):
            assert torch.equal(g.patches, w.patches[r::after]) and torch.equal(g.offsets, w.offsets[r::after])
            assert torch.equal(g.labels, w.labels[r::after])
    for p in new:
        p.close()


@pytest.mark.skipif(not dali_available(), reason="NVIDIA DALI is not installed")
def test_backends_agree_and_states_cross(dataset):
    root, _, _ = dataset
    seed = int(np.random.default_rng().integers(1 << 30))
    d, _, _ = make(root, "png", "dali", seed=seed)
    t, _, _ = make(root, "png", "torch", seed=seed, workers=2)    # worker processes: same output
    for _ in range(3):
        a, b = next(d), next(t)
        assert torch.equal(a.patches, b.patches) and torch.equal(a.offsets, b.offsets)
    t.load_state_dict(d.state_dict())
    a, b = next(d), next(t)
    assert torch.equal(a.patches, b.patches)
    d.close()
    t.close()


def test_state_mismatch_is_a_clear_error(dataset):
    root, _, _ = dataset
    pipe, _, _ = make(root, "raw", "torch", batch=4, world=1, seed=3)
    next(pipe)
    state = pipe.state_dict()
    for kwargs, what in ((dict(batch=8), "global batch"), (dict(seed=4), "seed")):
        other, _, _ = make(root, "raw", "torch", **{"batch": 4, "seed": 3, **kwargs})
        with pytest.raises(PipelineStateError, match=what):
            other.load_state_dict(state)
        other.close()
    other, _, _ = make(root, "png", "torch", batch=4, seed=3)
    with pytest.raises(PipelineStateError, match="dataset"):
        other.load_state_dict(state)
    with pytest.raises(PipelineStateError, match="version"):
        other.load_state_dict({**state, "version": 99})
    pipe.close()


def test_bad_setups_fail_before_building(dataset, tmp_path):
    root, images, labels = dataset
    with pytest.raises(ValueError, match="cannot share evenly"):
        make(root, "raw", "torch", batch=3, world=2, sizes=(16,), probs=(1.0,))
    with pytest.raises(SourceError, match="data.resolution"):
        cfg = load_config(None, [f"data.path={root / 'raw'}", "data.resolution=32"])
        build_pipeline(cfg, StochasticSchedule(32, 4), 0, 1)
    # a truncated shard is caught from the manifest, before DALI or a worker touches it: when it is
    # opened (format version 4: by the plan, in the pipeline's own process, when a step first uses it)
    import shutil
    copy = tmp_path / "copy"
    shutil.copytree(root / "png", copy)
    tar = sorted(copy.glob("*.tar"))[1]
    tar.write_bytes(tar.read_bytes()[:-512])
    cfg = load_config(None, [f"data.path={copy}", f"data.resolution={R}", "data.backend=torch", "data.workers=2"])
    with pytest.raises(ShardError, match=f"{tar}: {tar.stat().st_size} bytes, the manifest says"):
        pipe = build_pipeline(cfg, StochasticSchedule(R, 4), 0, 1)
        for _ in range(4 * len(images)):
            next(pipe)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("enc", ["png", "jpeg", "raw"])
def test_cuda_patches_match_cpu(dataset, backend, enc):
    root, images, labels = dataset
    if not (root / enc).exists():
        write_shards(root / "d.npz", root / enc, workers=1, encoding=enc, quality=95, max_count=10, progress=False)
    seed = int(np.random.default_rng().integers(1 << 30))
    cpu, _, _ = make(root, enc, backend, seed=seed)
    gpu, _, _ = make(root, enc, backend, seed=seed)
    gpu.close()
    gpu = build_pipeline(gpu.cfg, gpu.schedule, 0, 1, torch.device("cuda"))
    for _ in range(4):
        a, b = next(cpu), next(gpu)
        assert b.patches.is_cuda and b.offsets.is_cuda and b.labels.is_cuda
        assert torch.equal(a.offsets, b.offsets.cpu()) and torch.equal(a.labels, b.labels.cpu())
        if enc == "jpeg":                      # nvJPEG and libjpeg-turbo may round differently
            assert (a.patches.int() - b.patches.cpu().int()).abs().max() <= 4
        else:
            assert torch.equal(a.patches, b.patches.cpu())
    cpu.close()
    gpu.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_pipeline_offsets_reach_both_ends(dataset, backend):
    root, _, _ = dataset
    pipe, _, _ = make(root, "raw", backend, sizes=(4,), probs=(1.0,))
    offs = torch.cat([next(pipe).offsets for _ in range(20)])      # 20 steps x 16 patches
    pipe.close()
    for axis in (0, 1):
        counts = torch.bincount(offs[:, axis], minlength=R - 4 + 1)
        assert len(counts) == R - 4 + 1 and (counts > 0).all(), counts   # 0 and R-s included, nothing beyond


@pytest.mark.parametrize("backend", BACKENDS)
def test_grayscale_dataset(tmp_path, backend):
    rng = np.random.default_rng()
    images = rng.integers(0, 256, (9, 8, 8), dtype=np.uint8)
    np.savez(tmp_path / "g.npz", images=images)
    write_shards(tmp_path / "g.npz", tmp_path / "png", workers=1, progress=False, shuffle_seed=None)
    cfg = load_config(None, [f"data.path={tmp_path / 'png'}", "data.resolution=8", "data.channels=1",
                             f"data.backend={backend}", "data.workers=0", "train.batch=2", "train.seed=5"])
    sch = StochasticSchedule(8, 2, sizes=[4, 8], probs=[0.5, 0.5], seed=5)
    pipe = build_pipeline(cfg, sch, 0, 1)
    plan = SamplePlan(9, np.full(9, -1), sch, 5, 0, 1)
    for _ in range(4):
        b = next(pipe)
        step = plan.step(b.images_seen)
        assert b.patches.shape[3] == 1 and (b.labels == -1).all()
        for j in range(len(b.labels)):
            x0, y0 = b.offsets[j].tolist()
            assert torch.equal(b.patches[j], expected_patch(images[..., None], step.indices[j], x0, y0, b.patch_size))
    pipe.close()


def test_auto_falls_back_to_torch_without_dali(dataset, monkeypatch):
    from pdiff import pipelines
    root, _, _ = dataset
    monkeypatch.setattr(pipelines, "_DALI", [False])          # as on a box with only torch and triton
    pipe, _, _ = make(root, "raw", "auto")
    assert pipe.backend == "torch" and next(pipe).patches.shape[3] == 3
    pipe.close()
    with pytest.raises(ImportError, match="data.backend=torch"):
        make(root, "raw", "dali")


@pytest.mark.parametrize("backend", BACKENDS)
def test_ranks_together_read_what_one_process_reads(dataset, backend):
    """Rank r's batch = rows r, r+W, ... of the single-process batch (within the first epoch)."""
    root, _, _ = dataset
    seed = int(np.random.default_rng().integers(1 << 30))
    kw = dict(batch=4, seed=seed, sizes=(8, 16), probs=(0.5, 0.5))
    one = make(root, "raw", backend, world=1, **kw)[0]
    ranks = [make(root, "raw", backend, world=2, rank=r, **kw)[0] for r in range(2)]
    seen = 0
    while seen + 8 <= 36:                      # 37 images: stay inside epoch 0
        a, parts = next(one), [next(p) for p in ranks]
        for r, b in enumerate(parts):
            assert torch.equal(b.patches, a.patches[r::2]) and torch.equal(b.offsets, a.offsets[r::2])
            assert torch.equal(b.labels, a.labels[r::2])
        seen = a.images_seen + one.schedule.batch_for(a.patch_size)
    for p in [one, *ranks]:
        p.close()


# ---------------------------------------------------------------------------------------------
# The in-memory mode (data.cache)

@pytest.mark.parametrize("cache", ["host", "device"])
@pytest.mark.parametrize("enc", ["png", "raw"])
def test_in_memory_mode_gives_the_streaming_patches(dataset, tmp_path, cache, enc):
    """data.cache: the same plan, flips, patches (bit for bit), offsets and labels as the streaming
    torch pipeline, for a rank of two, across epochs; states cross between the modes both ways."""
    root, _, _ = dataset
    seed = int(np.random.default_rng().integers(1 << 30))
    kw = dict(world=2, rank=1, seed=seed, xflip=True)
    stream = make(root, enc, "torch", **kw)[0]
    cached = make(root, enc, "torch", cache=cache, workers=2, **kw)[0]
    assert cached.backend == "memory" and cached.data.shape == (37, R, R, 3)
    for _ in range(12):                                          # 37 images: epochs roll over
        a, b = next(stream), next(cached)
        assert (a.patch_size, a.images_seen) == (b.patch_size, b.images_seen)
        assert b.patches.dtype == torch.uint8 and torch.equal(a.patches, b.patches)
        assert torch.equal(a.offsets, b.offsets) and torch.equal(a.labels, b.labels)
    torch.save(cached.state_dict(), tmp_path / "cached.pt")
    want = [next(stream) for _ in range(3)]
    resumed = make(root, enc, "torch", **kw)[0]                     # streaming, from the cached run's state
    resumed.load_state_dict(torch.load(tmp_path / "cached.pt", weights_only=True))
    again = make(root, enc, "torch", cache=cache, **kw)[0]          # cached, from the streaming run's state
    again.load_state_dict(stream.state_dict())
    for w in want:
        got = next(resumed)
        assert got.images_seen == w.images_seen and torch.equal(got.patches, w.patches)
    assert next(again).images_seen == want[-1].images_seen + stream.schedule.batch_for(want[-1].patch_size)
    for p in (stream, cached, resumed, again):
        p.close()


def test_in_memory_mode_refuses_what_does_not_fit(dataset, monkeypatch):
    """Too little memory: refused before loading, naming the mode, the size needed (samples, shape,
    type) and what is available, and what to set instead."""
    from pdiff.pipelines import memory
    root, _, _ = dataset
    need = 37 * R * R * 3
    monkeypatch.setattr(memory, "host_available_bytes", lambda: int(need / memory.HOST_SHARE) - 1)
    for cache in ("host", "device"):                     # on a CPU the device's memory is the host's
        with pytest.raises(SourceError, match=rf"data.cache={cache}: the dataset needs 28.4 kB decoded "
                                              rf"\(37 samples of {R}x{R}x3 uint8\) but the host has 35.5 kB "
                                              rf"available.*data.cache=none"):
            make(root, "raw", "torch", cache=cache)
    monkeypatch.setattr(memory, "host_available_bytes", lambda: int(need / memory.HOST_SHARE) + 1)
    make(root, "raw", "torch", cache="host")[0].close()             # just fits
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")                     # every rank holds its own copy
    with pytest.raises(SourceError, match="per process, 227.3 kB for the 8 processes on this node"):
        make(root, "raw", "torch", cache="host")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("cache", ["host", "device"])
def test_in_memory_mode_on_cuda_matches_streaming(dataset, cache):
    root, _, _ = dataset
    seed = int(np.random.default_rng().integers(1 << 30))
    stream = make(root, "png", "torch", seed=seed, xflip=True)[0]
    cached = make(root, "png", "torch", seed=seed, xflip=True, cache=cache, device="cuda")[0]
    assert cached.data.is_cuda == (cache == "device") and cached.data.is_pinned() == (cache == "host")
    for _ in range(6):
        a, b = next(stream), next(cached)
        assert b.patches.is_cuda and torch.equal(a.patches, b.patches.cpu())
    stream.close()
    cached.close()


def test_epoch_permutation_is_numpys_in_half_the_memory():
    """The int32 shuffle gives numpy's own permutation(n) (the order every earlier run and checkpoint
    used), on fresh sizes and seeds."""
    rng = np.random.default_rng()
    for n in [1, 2, *rng.integers(3, 200_000, 6).tolist()]:
        seed, epoch = int(rng.integers(1 << 31)), int(rng.integers(100))
        got = epoch_permutation(n, seed, epoch)
        assert got.dtype == np.int32
        np.testing.assert_array_equal(got, np.random.default_rng([seed, epoch, 0x5EED]).permutation(n))
