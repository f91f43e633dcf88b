"""The house's layers, as import-linter contracts (pyproject.toml's [tool.importlinter]): which part of
pdiff may import which, nothing imports the CLI dispatcher, no import cycles; and imports inside
functions only where a comment says why (an optional or heavy dependency kept off a path that runs
without it).

The contracts are checked on the package as the wheel lays it out (kernels/, pipelines/ and tools/ under
pdiff/, from pyproject.toml's package-dir), copied into a temporary folder: grimp, import-linter's graph
builder, walks the package's one folder and would not see the mapped ones.

    python tests/test_layers.py      # the imports inside functions, counted and listed
"""
from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = REPO / "pyproject.toml"


def package_dirs() -> dict[str, Path]:
    """Installed package name -> source folder, from pyproject.toml's package-dir."""
    mapping = tomllib.loads(PYPROJECT.read_text())["tool"]["setuptools"]["package-dir"]
    return {name: REPO / folder for name, folder in mapping.items()}


def lay_out(dest: Path) -> Path:
    """The package's .py files under dest/pdiff/ as the wheel installs them; returns dest."""
    for name, folder in sorted(package_dirs().items()):
        target = dest.joinpath(*name.split("."))
        shutil.copytree(folder, target, dirs_exist_ok=True,
                        ignore=lambda d, names: [n for n in names if n == "__pycache__" or
                                                 (not n.endswith(".py") and not (Path(d) / n).is_dir())])
    return dest


def lint(src: Path, config: Path = PYPROJECT) -> subprocess.CompletedProcess:
    """lint-imports on the package laid out under ``src`` (found first on the path)."""
    code = ("import sys; from importlinter.cli import lint_imports; "
            f"sys.exit(lint_imports(config_filename={str(config)!r}, no_cache=True))")
    env = {**os.environ, "PYTHONPATH": str(src)}
    return subprocess.run([sys.executable, "-c", code], cwd=src, env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def laid_out(tmp_path_factory) -> Path:
    return lay_out(tmp_path_factory.mktemp("layers"))


def test_the_import_contracts_hold(laid_out):
    run = lint(laid_out)
    assert run.returncode == 0, f"import-linter's contracts are broken:\n{run.stdout}\n{run.stderr}"
    assert "0 broken" in run.stdout


def layer_modules() -> set[str]:
    (layers,) = [c for c in tomllib.loads(PYPROJECT.read_text())["tool"]["importlinter"]["contracts"]
                 if c["type"] == "layers"]
    return {m.strip() for layer in layers["layers"] for m in layer.replace("|", ":").split(":")}


def test_every_module_has_a_layer(laid_out):
    """A new module of pdiff must be placed in the layers (the contract checks only what it names)."""
    found = {f"pdiff.{p.stem if p.is_file() else p.name}" for p in (laid_out / "pdiff").iterdir()
             if (p.suffix == ".py" and p.stem != "__init__") or (p / "__init__.py").is_file()}
    assert found - layer_modules() == set(), "place these in pyproject.toml's layers"
    assert layer_modules() - found == set(), "the layers name modules that do not exist"


def test_the_contracts_catch_a_bad_import(tmp_path):
    """Each contract fails on an import that breaks it: a core module importing the trainer, a tool
    importing the CLI dispatcher, and a cycle hidden inside a function."""
    src = lay_out(tmp_path)
    with open(src / "pdiff" / "coords.py", "a") as f:         # core -> train: up the layers
        f.write("\n\ndef _bad():\n    from pdiff import train  # noqa\n")
    with open(src / "pdiff" / "tools" / "config.py", "a") as f:
        f.write("\n\nfrom pdiff.cli import main as _cli  # noqa\n")
    with open(src / "pdiff" / "checksum.py", "a") as f:       # checksum <-> errors: a cycle
        f.write("\n\ndef _loop():\n    from pdiff.checksum import verify  # noqa\n")
    with open(src / "pdiff" / "errors.py", "a") as f:
        f.write("\n\ndef _loop():\n    from pdiff.checksum import verify  # noqa\n")
    run = lint(src)
    assert run.returncode != 0
    out = " ".join(run.stdout.split())
    assert "Contracts: 0 kept, 3 broken." in out, out
    assert "pdiff.coords -> pdiff.train" in out
    assert "pdiff.tools.config -> pdiff.cli" in out
    assert ".errors -> .checksum" in out or ".checksum -> .errors" in out


# --------------------------------------------------------------------------------------------
# Imports inside functions

def _module_name(path: Path) -> str:
    for name, folder in package_dirs().items():
        if path.is_relative_to(folder):
            return ".".join([name] + list(path.relative_to(folder).with_suffix("").parts))
    raise ValueError(path)


def function_imports() -> tuple[list[tuple[str, int, str, str]], int]:
    """The first-party imports inside functions as (file, line, imported module, the line's text), and
    the number of first-party imports in all."""
    found, total = [], 0
    for folder in sorted(set(package_dirs().values())):
        for path in sorted(folder.rglob("*.py")):
            module = _module_name(path)
            package = module if path.name == "__init__.py" else module.rpartition(".")[0]
            text = path.read_text()
            lines = text.splitlines()

            def visit(node, inside: bool):
                nonlocal total
                for child in ast.iter_child_nodes(node):
                    if isinstance(child, (ast.Import, ast.ImportFrom)):
                        if isinstance(child, ast.ImportFrom) and child.level:
                            base = package.split(".")[:len(package.split(".")) - child.level + 1]
                            target = ".".join(base + ([child.module] if child.module else []))
                        else:
                            target = child.module if isinstance(child, ast.ImportFrom) else child.names[0].name
                        if target == "pdiff" or target.startswith("pdiff."):
                            total += 1
                            if inside:
                                found.append((str(path.relative_to(REPO)), child.lineno, target,
                                              lines[child.end_lineno - 1].strip()))
                    visit(child, inside or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)))
            visit(ast.parse(text), False)
    return found, total


def test_imports_inside_functions_say_why():
    """A first-party import inside a function is there for a dependency the module keeps off a path
    that runs without it (torch off the shard writer and `pdiff config`, DALI, diffusers, Triton),
    and its line says so in a comment; everything else is imported at the module's top."""
    found, total = function_imports()
    unexplained = [f"{f}:{n}: {text}" for f, n, _, text in found if "#" not in text]
    assert unexplained == [], "import at the module's top, or say why not:\n" + "\n".join(unexplained)
    assert total > 100           # the walk found the package's imports


if __name__ == "__main__":
    found, total = function_imports()
    for f, n, target, text in found:
        print(f"{f}:{n}: {text}")
    print(f"{len(found)} of {total} first-party imports are inside functions")


def test_ruff_passes():
    """The code passes ruff with the project's config (pyproject.toml's [tool.ruff]: line length 120,
    pycodestyle errors and warnings, pyflakes)."""
    p = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", str(REPO)], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-2000:]
