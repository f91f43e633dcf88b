"""Without CUDA, Triton kernels run under the interpreter: set it before anything imports triton.
Fixtures several test modules share."""
import os

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# `make test` runs the suite on every core with pytest-xdist (`-n auto`): each worker then takes one
# torch thread, and so do the trainers and launchers its tests start (they inherit the environment),
# so that the workers do not oversubscribe the cores.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


@pytest.fixture
def one_thread():
    """One torch thread for the test (in-process runs on a shared 2-core machine), then as before."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def random_shards(tmp_path_factory):
    """40 random 16x16 RGB images as pdiff shards of at most 16 images each."""
    from pdiff.pipelines.shards import write_shards
    root = tmp_path_factory.mktemp("random_shards")
    rng = np.random.default_rng()
    np.savez(root / "img.npz", images=rng.integers(0, 256, (40, 16, 16, 3), dtype=np.uint8))
    write_shards(root / "img.npz", root / "shards", workers=1, max_count=16, progress=False)
    return root / "shards"


@pytest.fixture(scope="module")
def digits_shards(tmp_path_factory):
    """512 of scikit-learn's digits (real scans, with labels) at 16x16 grey as pdiff shards of 128."""
    from PIL import Image
    from sklearn.datasets import load_digits
    from pdiff.pipelines.shards import write_shards
    root = tmp_path_factory.mktemp("digits")
    d = load_digits()
    imgs = (d.images[:512] / 16.0 * 255).round().astype(np.uint8)
    imgs = np.stack([np.asarray(Image.fromarray(i).resize((16, 16), Image.BICUBIC)) for i in imgs])
    np.savez(root / "digits.npz", images=imgs, labels=d.target[:512].astype(np.int64))
    write_shards(root / "digits.npz", root / "shards", max_count=128, workers=1, progress=False)
    return root / "shards"
