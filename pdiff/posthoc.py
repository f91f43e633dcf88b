"""Post-hoc EMA (EDM2, Karras et al. 2024, section 3.2 and appendix C.2): the power-function
average of any width sigma_rel, at the time of any snapshot, from the snapshots of the power EMAs a
run tracked (ema.mode=power, pdiff.ema).

Every tracked average is a weighted integral of the training weights theta(tau) under a profile
p_i(tau) = (g_i + 1) tau^g_i / t_i^(g_i + 1) on [0, t_i]. The average under a wanted profile p is
approximated by sum_i c_i snapshot_i, with c the least-squares fit of p by the p_i in L2:
A c = b, A_ij = <p_i, p_j>, b_i = <p_i, p>, inner products in closed form (``profile_inner_product``).
The coefficients are then scaled to sum to one (as EDM2's code does), so that a weight that never
moved stays where it was. A wanted profile that is one of the snapshots' is reproduced exactly.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .ema import STD_MAX, gamma_to_std, std_to_gamma
from .errors import UserError
from .snapshot import _build, _config_from, read_metadata, read_tensors, save_snapshot, snapshot_name


class PosthocError(UserError, ValueError):
    """A run without power-EMA snapshots, a time no snapshot was taken at, a sigma_rel out of range."""
    exit_code = 2


def profile_inner_product(t_a, gamma_a, t_b, gamma_b):
    """<p_a, p_b> = integral over tau of p_a(tau) p_b(tau) for power profiles ending at t_a and t_b
    (numpy broadcasting). Over [0, m], m = min(t_a, t_b):
    (g_a + 1)(g_b + 1) m^(g_a + g_b + 1) / ((g_a + g_b + 1) t_a^(g_a + 1) t_b^(g_b + 1)),
    written as a ratio (m / M)^g_M / M with M the later end and g_M its exponent, which stays in
    range for the exponents and image counts of real runs."""
    t_a, g_a, t_b, g_b = (np.asarray(v, np.float64) for v in (t_a, gamma_a, t_b, gamma_b))
    later = np.maximum(t_a, t_b)
    earlier = np.minimum(t_a, t_b)
    g_later = np.where(t_a >= t_b, g_a, g_b)
    return (g_a + 1) * (g_b + 1) / ((g_a + g_b + 1) * later) * (earlier / later) ** g_later


def solve_coefficients(in_images, in_gammas, out_images: float, out_gamma: float) -> np.ndarray:
    """The weights c of the snapshots (ended at ``in_images`` with exponents ``in_gammas``) whose
    sum best matches the power profile (out_images, out_gamma), scaled to sum to one."""
    t, g = np.asarray(in_images, np.float64), np.asarray(in_gammas, np.float64)
    a = profile_inner_product(t[:, None], g[:, None], t[None, :], g[None, :])
    b = profile_inner_product(t, g, out_images, out_gamma)
    c = np.linalg.solve(a, b)
    return c / c.sum()


# --------------------------------------------------------------------------------------------
# The snapshots of a run

@dataclass(frozen=True)
class PowerSnapshot:
    path: Path
    images_seen: int
    std: float
    gamma: float


def power_snapshots(run_dir: str | os.PathLike) -> list[PowerSnapshot]:
    """The power-EMA snapshots in RUN/snapshots (metadata ema_mode=power), by images seen and std."""
    folder = Path(run_dir) / "snapshots"
    if not folder.is_dir():
        raise PosthocError(f"{run_dir}: no snapshots/ folder; give the run folder of a run trained with "
                           f"ema.mode=power")
    found = []
    for path in sorted(folder.glob("ema-*.safetensors")):
        meta = read_metadata(path)
        if meta.get("ema_mode") != "power":
            continue
        try:
            found.append(PowerSnapshot(path, int(meta["images_seen"]), float(meta["ema_std"]),
                                       float(meta["ema_gamma"])))
        except (KeyError, ValueError) as e:
            raise PosthocError(f"{path}: power-EMA snapshot with unreadable metadata ({e})") from None
    if not found:
        raise PosthocError(f"{folder}: no power-EMA snapshots (ema_mode=power in their metadata); post-hoc EMA "
                           f"needs a run trained with ema.mode=power")
    return sorted(found, key=lambda s: (s.images_seen, s.std))


def snapshots_until(snapshots: list[PowerSnapshot], at: int | None) -> tuple[list[PowerSnapshot], int]:
    """The snapshots a reconstruction at ``at`` images uses (all taken by then) and ``at`` itself
    (default: the newest snapshot's). ``at`` must be a time some snapshot was taken at: the
    snapshots say nothing about the weights between their times and the next one."""
    times = sorted({s.images_seen for s in snapshots})
    at = times[-1] if at is None else int(at)
    if at not in times:
        near = ", ".join(str(t) for t in times[-8:])
        raise PosthocError(f"--at {at}: no snapshot was taken at {at} images; reconstruct at one of the "
                           f"snapshot times (the latest: {near})")
    return [s for s in snapshots if 0 < s.images_seen <= at], at


@dataclass
class Reconstruction:
    state: dict[str, torch.Tensor]
    cfg: object
    images_seen: int
    std: float
    gamma: float
    sources: list[dict]

    def metadata(self) -> dict[str, str]:
        return {"ema_mode": "posthoc", "ema_std": f"{self.std:.6g}", "ema_gamma": repr(self.gamma),
                "ema_posthoc_sources": json.dumps(self.sources)}


def reconstruct(snapshots: list[PowerSnapshot], std: float, at: int | None = None) -> Reconstruction:
    """The power-function EMA of width ``std`` at ``at`` images (default: the newest snapshot)
    from a run's power snapshots: sum_i c_i snapshot_i accumulated in float64."""
    if not 0 < std < STD_MAX:
        raise PosthocError(f"--std {std}: a sigma_rel must lie in (0, {STD_MAX:.4f}) (EDM2 tracks 0.05 and 0.1)")
    gamma = std_to_gamma(std)
    used, at = snapshots_until(snapshots, at)
    coefs = solve_coefficients([s.images_seen for s in used], [s.gamma for s in used], at, gamma)
    total: dict[str, torch.Tensor] = {}
    for snap, c in zip(used, coefs):
        for k, v in read_tensors(snap.path).items():
            if not v.is_floating_point():       # integer buffers are constants: the newest's
                total[k] = v
                continue
            acc = total.get(k)
            total[k] = v.double() * float(c) if acc is None else acc.add_(v.double(), alpha=float(c))
    latest = used[-1]
    cfg = _config_from(json.loads(read_metadata(latest.path)["config"]), str(latest.path))
    state = {k: (v.float() if v.is_floating_point() else v) for k, v in total.items()}
    sources = [{"file": s.path.name, "images_seen": s.images_seen, "std": s.std, "coefficient": float(c)}
               for s, c in zip(used, coefs)]
    return Reconstruction(state, cfg, at, float(std), gamma, sources)


def reconstruction_path(run_dir: str | os.PathLike, images_seen: int, std: float) -> Path:
    """RUN/posthoc/ema-<images>-<std>.safetensors: outside snapshots/, so that reconstructions are
    never taken for tracked snapshots."""
    return Path(run_dir) / "posthoc" / snapshot_name(images_seen, f"-{std:.3f}")


def save_reconstruction(rec: Reconstruction, path: str | os.PathLike) -> Path:
    """A snapshot `pdiff sample` and `pdiff fid` read, written by pdiff.snapshot.save_snapshot."""
    model = _build(rec.cfg, rec.state, str(path), "cpu")
    return save_snapshot(path, model, rec.cfg, rec.images_seen, rec.metadata())


def parse_stds(text: str) -> list[float]:
    """'0.03:0.15:0.01' (start:stop:step, stop included) or '0.05,0.07,0.1' -> sorted sigma_rel values."""
    text = str(text).strip()
    m = re.fullmatch(r"([0-9.eE+-]+):([0-9.eE+-]+):([0-9.eE+-]+)", text)
    try:
        if m:
            lo, hi, step = (float(x) for x in m.groups())
            if step <= 0 or hi < lo:
                raise ValueError("need start <= stop and a positive step")
            n = int(math.floor((hi - lo) / step + 1e-9)) + 1
            values = [round(lo + i * step, 10) for i in range(n)]
        else:
            values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError as e:
        raise PosthocError(f"--stds {text!r}: expected start:stop:step (e.g. 0.03:0.15:0.01) or a comma list "
                           f"({e})") from None
    if not values:
        raise PosthocError(f"--stds {text!r}: no values")
    for v in values:
        if not 0 < v < STD_MAX:
            raise PosthocError(f"--stds {text!r}: {v} is not a sigma_rel in (0, {STD_MAX:.4f})")
    return sorted(set(values))


__all__ = ["PosthocError", "PowerSnapshot", "Reconstruction", "gamma_to_std", "parse_stds", "power_snapshots",
           "profile_inner_product", "reconstruct", "reconstruction_path", "save_reconstruction",
           "snapshots_until", "solve_coefficients", "std_to_gamma"]
