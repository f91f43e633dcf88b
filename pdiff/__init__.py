"""pdiff: Patch Diffusion training (Wang et al., NeurIPS 2023) on EDM foundations."""
import os as _os

__version__ = "0.1.0"

# The repository keeps kernels/, pipelines/ and tools/ beside this folder; the wheel installs them as
# pdiff.kernels, pdiff.pipelines and pdiff.tools (pyproject.toml's package-dir). From a source
# checkout that is not installed (`PYTHONPATH=CHECKOUT`, as benchmarks/gpu_suite.sh runs), the same
# names resolve by searching the checkout's root too.
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if _os.path.isfile(_os.path.join(_root, "pyproject.toml")) and _os.path.isdir(_os.path.join(_root, "kernels")):
    __path__.append(_root)
