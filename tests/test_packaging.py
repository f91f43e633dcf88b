"""The installed distribution: one top-level import name, `pdiff`, with kernels, pipelines and tools
under it (a `kernels` package on the path would shadow Hugging Face's, which transformers probes)."""
from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_installs_one_top_level_name(tmp_path):
    # Built from a copy: setuptools writes build/ and *.egg-info next to the sources.
    src = tmp_path / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".git", ".venv", "build", "runs", "*.egg-info", ".dali",
                                                             "__pycache__", ".cache", ".pytest_cache"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path), str(src)], check=True, capture_output=True, text=True)
    (wheel,) = tmp_path.glob("pdiff-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/", 1)[0] for n in names if not n.split("/", 1)[0].endswith(".dist-info")}
    assert top == {"pdiff"}
    # Every module of the four source folders is in the wheel under pdiff/ (the package list in
    # pyproject.toml is explicit: a new subpackage must be added there).
    expected = {f"pdiff/{p.relative_to(REPO / 'pdiff').as_posix()}" for p in (REPO / "pdiff").rglob("*.py")}
    for folder in ("kernels", "pipelines", "tools"):
        expected |= {f"pdiff/{folder}/{p.relative_to(REPO / folder).as_posix()}" for p in (REPO / folder).rglob("*.py")}
    expected |= {f"pdiff/presets/{p.name}" for p in (REPO / "pdiff" / "presets").glob("*.yaml")}
    assert expected - set(names) == set()
    (top_level,) = [n for n in names if n.endswith(".dist-info/top_level.txt")]
    assert zipfile.ZipFile(wheel).read(top_level).decode().split() == ["pdiff"]

    # Unpacked on its own (no site-packages, not the checkout): the subpackages resolve under pdiff.
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    probe = ("import importlib.util as u; "
             "print([bool(u.find_spec(n)) for n in ('pdiff.kernels', 'pdiff.pipelines', 'pdiff.tools', "
             "'kernels', 'pipelines', 'tools')])")
    out = subprocess.run([sys.executable, "-S", "-c", probe], cwd=site, env={"PYTHONPATH": str(site)},
                         capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[True, True, True, False, False, False]"


def test_the_checkout_is_not_part_of_the_package():
    """pdiff resolves kernels, pipelines and tools through the installation's package-dir mapping only:
    the checkout's other folders (tests, benchmarks, pdiff itself) are no subpackages of it."""
    probe = ("import importlib.util as u, pdiff; "
             "print(len(pdiff.__path__), [u.find_spec(n) is not None for n in ('pdiff.kernels', 'pdiff.pipelines', "
             "'pdiff.tools', 'pdiff.tests', 'pdiff.benchmarks', 'pdiff.pdiff', 'pdiff.docs')])")
    for cwd in (REPO, REPO / "tests"):
        out = subprocess.run([sys.executable, "-c", probe], cwd=cwd, capture_output=True, text=True,
                             check=True).stdout.strip()
        assert out == "1 [True, True, True, False, False, False, False]", cwd
