"""Fused Triton kernels vs eager torch vs torch.compile of the reference, in time and GB/s.

    python benchmarks/bench_kernels.py --out benchmarks/results            # full run
    python benchmarks/bench_kernels.py --out benchmarks/results --quick    # < 90 s on an H100

Shapes: 64x64 pixels at each patch size with its batch (batch * R / s patches of uint8 HWC, the
kernels' compact input, which the pipelines do not hand over yet: they convert to float32 CHW
first; bf16 network input and bf16 F, as the trainer uses them on CUDA), 32x32x4 latents (float32
CHW) at both patch sizes, and a large float32 shape moving over 256 MB.
Ops: the network input; the loss forward + backward (dL/dF); and, for the Triton providers, the
fused loss pass alone (loss_kernel, which the bandwidth target is judged on). Providers: the Triton kernels
with the noise passed in and with in-kernel Philox noise, the torch reference run eagerly, and
torch.compile (Inductor) of the reference. GB/s is always the bytes the FUSED version must move
(each input read once, each output written once) over the provider's time, compared with the
device's measured copy bandwidth. Times are medians of triton.testing.do_bench ("wall", what a
caller sees, launch overhead included) and of CUDA-graph replays ("gpu", device time only).
Also: peak memory of a small training step with and without the kernels. Prints a table and writes
JSON naming the machine. Without CUDA it says so and exits 0.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import sys
import time

import torch

TARGET_COPY_SHARE = 0.80       # of measured copy bandwidth, at the large shape
TARGET_VS_EAGER = 3.0          # speed-up over eager at training shapes
TARGET_VS_COMPILE = 1.0        # at least as fast as torch.compile of the reference


def shapes(batch: int, quick: bool):
    """(name, B, C, s, R, uint8 patches, net/F dtype)."""
    out = []
    for s in (16, 32, 64):
        out.append((f"pixels64_s{s}", batch * 64 // s, 3, s, 64, True, torch.bfloat16))
    for s in (16, 32):
        out.append((f"latent32x4_s{s}", batch * 32 // s, 4, s, 32, False, torch.bfloat16))
    out.append(("large", 4096, 3, 64, 64, False, torch.float32))
    if quick:
        keep = {"pixels64_s32", "large"}
        out = [o for o in out if o[0] in keep]
    return out


def make_inputs(b, c, s, res, uint8, dtype, device):
    g = torch.Generator(device).manual_seed(0)
    if uint8:
        patches = torch.randint(0, 256, (b, s, s, c), generator=g, device=device, dtype=torch.uint8)
    else:
        patches = torch.rand((b, c, s, s), generator=g, device=device) * 2 - 1
    sigma = (torch.randn(b, generator=g, device=device) * 1.2 - 1.2).exp()
    offsets = torch.randint(0, res - s + 1, (b, 2), generator=g, device=device)
    noise = torch.randn((b, c, s, s), generator=g, device=device)
    F = torch.randn((b, c, s, s), generator=g, device=device).to(dtype).requires_grad_()
    return patches, sigma, offsets, noise, F


def fused_bytes(op, b, c, s, uint8, dtype, noise_given):
    """What the fused kernels must move: every input read once, every output written once."""
    n = b * c * s * s
    patch = n * (1 if uint8 else 4)
    noise = n * 4 if noise_given else 0
    item = torch.tensor([], dtype=dtype).element_size()
    per_sample = b * (4 + 16)                     # sigma, offsets
    if op == "net_input":
        return patch + noise + b * (c + 2) * s * s * item + per_sample
    # loss_kernel: the fused pass alone (read F, y, n; write the unscaled dL/dF and B partial sums).
    # loss_fwbw: read F, y, (n), write dL/dF. The fused path also rescales the saved gradient in the
    # backward (2 more passes over F's size), which its loss_fwbw GB/s pays for.
    return n * item + patch + noise + n * item + per_sample


def bench(fn, cuda_graph: bool, quick: bool):
    import triton.testing
    if cuda_graph:
        try:
            return triton.testing.do_bench_cudagraph(fn, rep=20 if quick else 100, return_mode="median")
        except Exception as e:  # noqa: BLE001 - a provider that cannot be captured is reported, not fatal
            print(f"  (cuda graph capture failed: {type(e).__name__}: {str(e)[:120]})")
            return float("nan")
    return triton.testing.do_bench(fn, warmup=10 if quick else 25, rep=30 if quick else 100, return_mode="median")


def copy_bandwidth(device) -> float:
    import triton.testing
    x = torch.empty(256 * 2**20, dtype=torch.float32, device=device)   # 1 GiB
    y = torch.empty_like(x)
    ms = triton.testing.do_bench(lambda: y.copy_(x), warmup=5, rep=50, return_mode="median")
    return 2 * x.numel() * 4 / (ms * 1e-3) / 1e9


class StepNet(torch.nn.Module):
    """A small convolutional F for the peak-memory comparison (the kernels' share of a step)."""

    def __init__(self, c, width=64):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Conv2d(c + 2, width, 3, padding=1), torch.nn.SiLU(),
                                        torch.nn.Conv2d(width, width, 3, padding=1), torch.nn.SiLU(),
                                        torch.nn.Conv2d(width, c, 3, padding=1))

    def forward(self, x):
        return self.body(x)


def step_peak_memory(b, c, s, res, uint8, dtype, device, use_kernels):
    from pdiff.kernels import build_net_input, edm_patch_loss
    patches, sigma, offsets, _, _ = make_inputs(b, c, s, res, uint8, dtype, device)
    net = StepNet(c).to(device)
    backend = "triton" if use_kernels else "torch"

    def step():
        kw = dict(seed=1, images_seen=7)
        net_in = build_net_input(patches, sigma, offsets, res, out_dtype=dtype, backend=backend, **kw)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            F = net(net_in)
        edm_patch_loss(F, patches, sigma, backend=backend, **kw).mean().backward()

    step()
    net.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    return peak


def targets_met(rows, copy_gbps) -> list[dict]:
    """The issue's targets, for the rows measured so far: the large shape at >= 80% of the measured
    copy bandwidth; at training shapes >= 3x eager and no slower than torch.compile."""
    def get(shape, op, prov, key):
        return next((r[key] for r in rows if r["shape"] == shape and r["op"] == op and r["provider"] == prov), None)

    targets = []
    if any(r["shape"] == "large" for r in rows):
        for op in ("net_input", "loss_kernel"):
            for prov in ("triton", "triton_philox"):
                for key in ("gpu_gbps", "wall_gbps"):
                    share = get("large", op, prov, key) / copy_gbps
                    targets.append(dict(target=f"large {op} {prov} {key.split('_')[0]}: >= "
                                               f"{TARGET_COPY_SHARE:.0%} of copy",
                                        value=round(share, 3), met=share >= TARGET_COPY_SHARE))
    for op in ("net_input", "loss_fwbw"):
        for name in sorted({r["shape"] for r in rows} - {"large"}):
            for timing in ("wall_ms", "gpu_ms"):
                t = get(name, op, "triton", timing)
                vs_eager = get(name, op, "eager", timing) / t
                vs_compile = get(name, op, "compile", timing) / t
                tag = timing.split("_")[0]
                targets.append(dict(target=f"{name} {op} {tag}: >= {TARGET_VS_EAGER:.0f}x eager",
                                    value=round(vs_eager, 2), met=vs_eager >= TARGET_VS_EAGER))
                targets.append(dict(target=f"{name} {op} {tag}: >= 1x torch.compile",
                                    value=round(vs_compile, 2), met=vs_compile >= TARGET_VS_COMPILE))
    return targets


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="benchmarks/results", help="folder for the JSON result")
    ap.add_argument("--json", help="write the JSON to this file instead (rewritten after every shape)")
    ap.add_argument("--quick", action="store_true", help="fewer shapes and repetitions (< 90 s on an H100)")
    ap.add_argument("--batch", type=int, default=512,
                    help="full images per step (the presets' train.batch); a step of patch size s carries batch*R/s")
    args = ap.parse_args(argv)

    if not torch.cuda.is_available():
        print("bench_kernels: no CUDA device on this machine; the Triton kernels need one. Nothing measured.")
        return 0

    from pdiff.kernels import build_net_input, edm_patch_loss
    from pdiff.kernels.edm_loss import edm_loss_fused, edm_loss_ref
    from pdiff.kernels.net_input import net_input_ref

    t_start = time.time()
    device = torch.device("cuda")
    torch._dynamo.config.cache_size_limit = 64   # one graph per benchmarked shape and provider
    machine = dict(host=socket.gethostname(), gpu=torch.cuda.get_device_name(device),
                   capability=".".join(map(str, torch.cuda.get_device_capability(device))),
                   torch=torch.__version__, triton=__import__("triton").__version__,
                   cuda=torch.version.cuda, python=platform.python_version())
    copy_gbps = copy_bandwidth(device)
    print(f"{machine['gpu']} (sm_{machine['capability']}), torch {machine['torch']}, triton {machine['triton']}")
    print(f"measured copy bandwidth: {copy_gbps:.0f} GB/s (1 GiB device-to-device copy)\n")

    compiled_net_input = torch.compile(net_input_ref, dynamic=False)
    compiled_loss = torch.compile(edm_loss_ref, dynamic=False)

    gpu_tag = machine["gpu"].replace(" ", "_").replace("/", "_")
    path = args.json or os.path.join(args.out, f"kernels_{gpu_tag}{'_quick' if args.quick else ''}.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def save(targets, memory, complete):
        """Written after every shape too, so a run cut short (the suite's time limit) keeps its rows."""
        with open(path + ".tmp", "w") as f:
            json.dump(dict(benchmark="bench_kernels", machine=machine, quick=args.quick, batch=args.batch,
                           copy_bandwidth_gbps=copy_gbps, complete=complete, results=rows, targets=targets,
                           step_peak_memory=memory, seconds=round(time.time() - t_start, 1)), f, indent=1)
        os.replace(path + ".tmp", path)

    rows = []
    header = (f"{'shape':16s} {'op':11s} {'provider':16s} {'wall ms':>9s} {'GB/s':>7s} {'gpu ms':>9s} {'GB/s':>7s} "
              f"{'%copy':>6s}")
    print(header)
    print("-" * len(header))
    for name, b, c, s, res, uint8, dtype in shapes(args.batch, args.quick):
        patches, sigma, offsets, noise, F = make_inputs(b, c, s, res, uint8, dtype, device)
        seen_t = torch.tensor(12345, device=device)
        ni = dict(out_dtype=dtype)
        providers = {
            "net_input": {
                "triton": lambda: build_net_input(patches, sigma, offsets, res, noise=noise, backend="triton", **ni),
                "triton_philox": lambda: build_net_input(patches, sigma, offsets, res, seed=3, images_seen=seen_t,
                                                         backend="triton", **ni),
                "eager": lambda: net_input_ref(patches, sigma, offsets, res, noise, out_dtype=dtype),
                "compile": lambda: compiled_net_input(patches, sigma, offsets, res, noise, out_dtype=dtype),
            },
            "loss_kernel": {
                "triton": lambda: edm_loss_fused(F, patches, sigma, noise, None, 0, 0, 0.5, True),
                "triton_philox": lambda: edm_loss_fused(F, patches, sigma, None, seen_t.reshape(1), 3, 0, 0.5, True),
            },
            "loss_fwbw": {
                "triton": lambda: torch.autograd.grad(
                    edm_patch_loss(F, patches, sigma, noise=noise, backend="triton").mean(), F),
                "triton_philox": lambda: torch.autograd.grad(
                    edm_patch_loss(F, patches, sigma, seed=3, images_seen=seen_t, backend="triton").mean(), F),
                "eager": lambda: torch.autograd.grad(edm_loss_ref(F, patches, sigma, noise).mean(), F),
                "compile": lambda: torch.autograd.grad(compiled_loss(F, patches, sigma, noise).mean(), F),
            },
        }
        for op, fns in providers.items():
            for prov, fn in fns.items():
                fn()                                     # compile / warm up
                torch.cuda.synchronize()
                nbytes = fused_bytes(op, b, c, s, uint8, dtype, noise_given=prov != "triton_philox")
                wall = bench(fn, False, args.quick)
                gpu = bench(fn, True, args.quick)
                row = dict(shape=name, batch=b, channels=c, patch=s, resolution=res,
                           patches="uint8_hwc" if uint8 else "float32_chw", dtype=str(dtype).replace("torch.", ""),
                           op=op, provider=prov, fused_bytes=nbytes, wall_ms=wall, gpu_ms=gpu,
                           wall_gbps=nbytes / (wall * 1e-3) / 1e9, gpu_gbps=nbytes / (gpu * 1e-3) / 1e9)
                row["gpu_share_of_copy"] = row["gpu_gbps"] / copy_gbps
                rows.append(row)
                print(f"{name:16s} {op:11s} {prov:16s} {wall:9.4f} {row['wall_gbps']:7.0f} {gpu:9.4f} "
                      f"{row['gpu_gbps']:7.0f} {100 * row['gpu_share_of_copy']:5.0f}%")
        del patches, sigma, offsets, noise, F
        torch.cuda.empty_cache()
        save(targets_met(rows, copy_gbps), [], complete=False)

    targets = targets_met(rows, copy_gbps)
    print("\ntargets:")
    for t in targets:
        print(f"  [{'met ' if t['met'] else 'MISS'}] {t['target']}: {t['value']}")

    memory = []
    mem_shapes = [sh for sh in shapes(args.batch, args.quick) if sh[0] != "large"]
    for name, b, c, s, res, uint8, dtype in mem_shapes:
        ref = step_peak_memory(b, c, s, res, uint8, dtype, device, use_kernels=False)
        fused = step_peak_memory(b, c, s, res, uint8, dtype, device, use_kernels=True)
        memory.append(dict(shape=name, batch=b, peak_bytes_reference=ref, peak_bytes_kernels=fused))
        print(f"step peak memory {name}: reference {ref / 2**20:.1f} MiB, kernels {fused / 2**20:.1f} MiB")

    save(targets, memory, complete=True)
    print(f"\nwrote {path} ({time.time() - t_start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
