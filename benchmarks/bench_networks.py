"""Training-step throughput of the denoiser networks at every patch size (forward + backward).

    python benchmarks/bench_networks.py --out benchmarks/results/networks_<machine>.json

For each network (DDPM++ at 64x64 as in the CelebA preset, ADM on 32x32x4 latents with 1000 classes)
and each patch size s, a step carries batch * R / s patches (the trainer's rule). Providers: torch
eager and torch.compile (inductor, one static graph per patch size), both under bf16 autocast on CUDA.
Also checked: compiled output matches eager (relative L2 error) and no recompilation happens once
every patch size has been seen. Each row has its training TFLOP/s (3x the forward FLOPs counted by
torch's flop counter) and the MFU against the card's dense bf16 peak (none on a CPU or an unknown
card). Prints a table and writes JSON naming the machine. The network
alone, as F runs inside the training step; `bench_step.py` measures the whole step as the trainer
builds it (pdiff.step.build_step).
"""
from __future__ import annotations

import argparse
import statistics
import time
import types

import torch

from pdiff.bench import device_sync, machine, machine_name, resolve_device, save_json, timed
from pdiff.flops import TRAIN_FLOPS_PER_FORWARD, device_card, forward_flops, mfu
from pdiff.networks import build_network

NETS = {
    "tiny": dict(resolution=32, channels=3, sizes=(8, 16, 32), batch=4,
                 cfg=dict(arch="ncsnpp", model_channels=16, channel_mult=[1, 2], num_blocks=1,
                          attn_resolutions=[16], dropout=0.1, label_dim=10, label_dropout=0.1)),
    "ddpmpp64": dict(resolution=64, channels=3, sizes=(16, 32, 64), batch=64,
                     cfg=dict(arch="ddpmpp", model_channels=128, channel_mult=[1, 2, 2, 2], num_blocks=4,
                              attn_resolutions=[16], dropout=0.05, label_dim=0, label_dropout=0.0)),
    "adm32_latent": dict(resolution=32, channels=4, sizes=(16, 32), batch=64,
                         cfg=dict(arch="adm", model_channels=192, channel_mult=[1, 2, 3, 4], num_blocks=3,
                                  attn_resolutions=[32, 16, 8], dropout=0.10, label_dim=1000,
                                  label_dropout=0.1)),
}


def net_cfg(d):
    return types.SimpleNamespace(coord_embed="none", coord_freqs=4, **d)


def inputs(batch, size, spec, device):
    x = torch.randn(batch, spec["channels"] + 2, size, size, device=device)
    noise = torch.randn(batch, device=device)
    ld = spec["cfg"]["label_dim"]
    labels = (torch.nn.functional.one_hot(torch.randint(0, ld, (batch,), device=device), ld).float()
              if ld else None)
    return x, noise, labels


def train_flops_per_patch(spec, size: int) -> int:
    """Forward + backward FLOPs of the network on one patch of ``size`` (counted on the meta device)."""
    with torch.device("meta"):
        net = build_network(net_cfg(spec["cfg"]), spec["resolution"], spec["channels"]).eval()
    return TRAIN_FLOPS_PER_FORWARD * forward_flops(net, spec["channels"], size, spec["cfg"]["label_dim"])


def step(model, x, noise, labels, device):
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        out = model(x, noise, labels)
    loss = out.float().square().mean()
    loss.backward()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nets", default="ddpmpp64,adm32_latent", help=f"from {', '.join(NETS)}")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--budget-s", type=float, default=1e9, help="skip work that starts after this long")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    device = resolve_device("auto")
    info = machine()
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    t0 = time.time()
    card = device_card(device)
    report = dict(machine=info, torch=torch.__version__, precision="bf16 autocast" if device.type == "cuda"
                  else "fp32", card=card.name if card else None, rows=[])

    def save():            # after every row (atomically): a run cut short keeps what it measured
        if args.out:
            save_json(report, args.out, "networks")

    for name in args.nets.split(","):
        spec = NETS[name]
        torch.manual_seed(0)
        net = build_network(net_cfg(spec["cfg"]), spec["resolution"], spec["channels"]).to(device).train()
        params = sum(p.numel() for p in net.parameters())
        train_flops = {size: train_flops_per_patch(spec, size) for size in spec["sizes"]}     # once per size
        with torch.no_grad():  # move the zero-initialised output layers so outputs are not trivially 0
            for p in net.parameters():
                p.add_(1e-2 * torch.randn_like(p))
        providers = [("eager", net)]
        if not args.no_compile:
            torch._dynamo.reset()
            torch._dynamo.config.error_on_recompile = False
            providers.append(("compile", torch.compile(net, dynamic=False, fullgraph=True)))
        for prov, model in providers:
            if time.time() - t0 > args.budget_s:
                print(f"budget reached, skipping {name}/{prov}", flush=True)
                continue
            # Warm up every patch size first (compilation), then forbid recompiles while timing.
            tc = time.time()
            for size in spec["sizes"]:
                b = spec["batch"] * spec["resolution"] // size
                x, noise, labels = inputs(b, size, spec, device)
                net.zero_grad(set_to_none=True)
                step(model, x, noise, labels, device)
            warm_s = time.time() - tc
            if prov == "compile":
                torch._dynamo.config.error_on_recompile = True
            for size in spec["sizes"]:
                b = spec["batch"] * spec["resolution"] // size
                x, noise, labels = inputs(b, size, spec, device)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()

                def fn():
                    net.zero_grad(set_to_none=True)
                    step(model, x, noise, labels, device)
                sec = statistics.median(timed(fn, args.iters, warmup=2, sync=device_sync(device)))
                peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0
                tflops = train_flops[size] * b / sec / 1e12
                util = mfu(tflops, card, "bf16")
                row = dict(net=name, params=params, provider=prov, size=size, patches=b, step_ms=sec * 1e3,
                           patches_per_s=b / sec, full_images_equiv_per_s=b * (size / spec["resolution"]) ** 2 / sec,
                           tflop_per_s=tflops, mfu=util, peak_gib=peak, warmup_s=warm_s)
                report["rows"].append(row)
                print(f"{name:13s} {prov:8s} s={size:3d} B={b:4d} {sec * 1e3:8.1f} ms  {b / sec:8.0f} patches/s "
                      f"{tflops:7.3g} TFLOP/s  MFU {'n/a' if util is None else f'{util:.1%}'}  "
                      f"peak {peak:5.1f} GiB", flush=True)
                save()
            torch._dynamo.config.error_on_recompile = False
            if prov == "compile":  # same function as eager (eval: dropout off; one extra forward graph)
                size = spec["sizes"][0]
                x, noise, labels = inputs(spec["batch"], size, spec, device)
                net.eval()
                with torch.no_grad(), torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
                    ref = net(x, noise, labels).float()
                    got = model(x, noise, labels).float()
                net.train()
                rel = float((got - ref).norm() / ref.norm())
                report["rows"].append(dict(net=name, check="compiled_vs_eager_rel_l2", size=size, value=rel))
                print(f"{name} s={size}: compiled vs eager (eval, bf16 autocast) rel L2 {rel:.2e}", flush=True)
                save()
        del net, providers
        if device.type == "cuda":
            torch.cuda.empty_cache()
    save()
    print(f"machine: {machine_name(info)}; total {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
