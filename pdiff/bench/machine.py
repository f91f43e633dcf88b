"""What the figures were measured on, where the results go, and the device to measure on."""
from __future__ import annotations

import json
import os
import platform
from datetime import datetime, timezone
from pathlib import Path

import torch

from pdiff.pipelines import dali_available


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(module: str) -> str | None:
    try:
        mod = __import__(module, fromlist=["__version__"])
        return str(getattr(mod, "__version__", None))
    except Exception:       # missing or broken installs (DALI without its CUDA libs) count as absent
        return None


def machine() -> dict:
    """What the figures were measured on."""
    info = {"host": platform.node(), "cpu": _cpu_model(), "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "gpu": None, "gpu_memory_gb": None, "gpu_count": 0,
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "cuda": torch.version.cuda, "triton": _version("triton"), "numpy": _version("numpy"),
                         "pillow": _version("PIL"), "dali": None}}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, gpu_memory_gb=round(p.total_memory / 2 ** 30, 1), gpu_count=torch.cuda.device_count())
    if dali_available():
        info["versions"]["dali"] = _version("nvidia.dali")
    return info


def machine_name(info: dict) -> str:
    return info.get("gpu") or f"{info.get('cpu')} ({info.get('cores')} cores)"


def device_sync(device: torch.device):
    """What to call before reading the clock: the device's queue drained (CUDA), or None."""
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else None


def save_json(payload: dict, out: str | Path | None, kind: str) -> Path:
    """``out``: a .json path, a folder (a timestamped name inside it), or None (the current folder)."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    name = f"bench-{kind}-{platform.node() or 'host'}-{stamp}.json"
    path = Path(out) if out else Path(name)
    if out and not str(out).endswith(".json"):
        path = Path(out) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=_jsonable) + "\n")
    os.replace(tmp, path)
    return path


def _jsonable(x):
    if isinstance(x, torch.device):
        return str(x)
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON serializable: {type(x)}")

