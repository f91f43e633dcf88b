"""Compile the kernels for an NVIDIA GPU on a machine without one, and read what ptxas made of them.

    python benchmarks/kernels_offline.py            # every launch variant of the kernels, for sm_90a (H100/H200)
    python benchmarks/kernels_offline.py --arch 80  # for an A100
    python benchmarks/kernels_offline.py --json benchmarks/results/kernels-offline-sm90.json

Triton's CPU interpreter (TRITON_INTERPRET=1, what the tests run) checks what the kernels compute,
but not that they compile: the interpreter accepts code the compiler rejects, and it says nothing of
registers, spills or vector widths. Triton ships the NVIDIA compiler chain (LLVM to PTX, ptxas to
cubin), which needs no GPU. So here the public launchers run with their kernel launch recorded
instead of executed; each recorded launch goes through Triton's own argument specialisation
(dtypes, 16-byte alignment, constexprs) for the chosen GPU, is compiled to a cubin, and ptxas -v
reports its registers and spills. The PTX shows whether global loads and stores are vectorised and
how many barriers (shared-memory layout conversions, reductions) a program passes; nvdisasm counts
the machine instructions (SASS) per element a thread handles, the ALU cost a memory-bound kernel
must keep under its bandwidth.

A diagnostic, not a gate: the report holds each figure against its budget (BUDGETS below) and says
which are missed, but a Triton or ptxas upgrade may move them. tests/test_kernels_offline.py runs
this script and asserts only what must hold on any compiler: every launch variant compiles, with no
spills and no stack.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field

import torch


@dataclass
class Launch:
    """One kernel launch as a launcher issued it: the @triton.jit function, grid, arguments."""
    kernel: object
    grid: tuple
    args: tuple
    kwargs: dict


@dataclass
class Report:
    """What one compiled launch variant looks like to the GPU."""
    name: str
    num_warps: int
    registers: int
    spill_bytes: int
    stack_bytes: int                              # local memory per thread (spills, local arrays)
    shared_bytes: int
    barriers: int
    sass_instructions: int                        # in the cubin (nvdisasm); no loops, so >= executed
    elements_per_thread: int                      # (channel, pixel) elements each thread handles
    loads: dict = field(default_factory=dict)     # PTX global load forms -> count, e.g. {"v4.b32": 12}
    stores: dict = field(default_factory=dict)

    def sass_per_element(self) -> float:
        return self.sass_instructions / max(self.elements_per_thread, 1)

    def access_bytes(self, which: str) -> float:
        """Mean bytes one thread moves per global load or store instruction ("loads"/"stores"):
        16 for 128-bit vectors, 1 for single bytes."""
        ops = getattr(self, which)
        total = sum(ops.values())
        return sum(n * _form_bytes(form) for form, n in ops.items()) / max(total, 1)


def _form_bytes(form: str) -> int:
    """Bytes of one PTX access form such as "v4.b32", "b16" or "v2.b64"."""
    vec = re.match(r"v(\d+)\.", form)
    bits = re.search(r"[bfus](\d+)$", form)
    return (int(vec.group(1)) if vec else 1) * int(bits.group(1)) // 8


class _Recorder:
    def __init__(self, kernel, launches):
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        def record(*args, **kwargs):
            self.launches.append(Launch(self.kernel, tuple(grid), args, dict(kwargs)))
        return record


@contextlib.contextmanager
def recording():
    """Within the block the kernel launchers record their launches (a list, yielded) and run nothing;
    their outputs are left unwritten. Inputs may be CPU tensors (only dtypes, strides and alignment
    matter to the compiler). The launches are recorded as a CUDA run issues them (fast math on, see
    _philox.box_muller), although TRITON_INTERPRET=1 is set meanwhile so that the dispatcher takes
    the Triton path for CPU tensors."""
    from pdiff.kernels import _philox, edm_loss, net_input
    modules = (net_input, edm_loss, _philox)
    launches: list[Launch] = []
    saved = [(m.launcher, m.fast_math) for m in modules]
    old_interp = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        for m in modules:
            m.launcher = lambda kernel, *tensors: _Recorder(kernel, launches)
            m.fast_math = lambda: True
        yield launches
    finally:
        for m, (launcher, fast_math) in zip(modules, saved):
            m.launcher, m.fast_math = launcher, fast_math
        if old_interp is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old_interp


def _jit_function(kernel):
    """The JITFunction behind a kernel; with TRITON_INTERPRET=1 at import @triton.jit made
    interpreter functions, which the compiler cannot take."""
    from triton.runtime.jit import JITFunction
    if not isinstance(kernel, JITFunction):
        raise RuntimeError("kernels_offline compiles the kernels for a GPU: run it in a process started without "
                           "TRITON_INTERPRET=1 (under the interpreter @triton.jit does not build compilable "
                           "kernels), e.g. env -u TRITON_INTERPRET python benchmarks/kernels_offline.py")
    return kernel


def compile_launch(launch: Launch, capability: int = 90):
    """Compile a recorded launch for CUDA compute capability ``capability`` (90: H100/H200) with the
    specialisation Triton's JIT would give the same arguments on a GPU. Returns the CompiledKernel."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature
    fn = _jit_function(launch.kernel)
    target = GPUTarget("cuda", capability, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*launch.args, **launch.kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, launch.kwargs, bound, specialization, options)
    source = ASTSource(fn, signature, constexprs, attrs)
    return triton.compile(source, target=target, options=options.__dict__)


def _ptxas_usage(ptx: str, capability: int) -> tuple[int, int, int]:
    """(registers per thread, spill bytes, stack frame bytes) from ptxas -v on the PTX (the cubin's
    own numbers are only read back from a loaded module, which needs a GPU)."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        res = subprocess.run([get_ptxas(capability).path, "-v", f"--gpu-name={sm_arch_from_capability(capability)}",
                              src, "-o", os.path.join(tmp, "k.cubin")], capture_output=True, text=True, check=True)
    log = res.stdout + res.stderr
    regs = re.search(r"Used (\d+) registers", log)
    spills = [int(v) for v in re.findall(r"(\d+) bytes spill (?:stores|loads)", log)]
    stack = re.search(r"(\d+) bytes stack frame", log)
    if regs is None:
        raise RuntimeError(f"ptxas -v printed no register count:\n{log}")
    return int(regs.group(1)), sum(spills), int(stack.group(1)) if stack else 0


def _global_ops(ptx: str, op: str) -> dict:
    """Global loads or stores (op "ld"/"st") by access form, e.g. {"v4.b32": 12, "b8": 48}. Loads from
    libdevice's constant table for sin/cos of huge arguments (a branch Box-Muller never takes) are
    left out: they are code, not data the kernel moves."""
    table_regs: set = set()
    counts: dict = {}
    for line in ptx.splitlines():
        m = re.match(r"\s*(?:mov|add|cvta)\.\S+\s+(%rd\d+),\s*([%\w]+)", line)
        if m and (m.group(2) == "__cudart_i2opi_f" or m.group(2) in table_regs):
            table_regs.add(m.group(1))
            continue
        m = re.search(rf"\b{op}\.global((?:\.[a-z0-9]+)+)\s.*?\[\s*(%rd\d+)", line)
        if m is None or m.group(2) in table_regs:
            continue
        parts = [p for p in m.group(1).split(".") if p and p not in _CACHE_HINTS]
        key = ".".join(parts)
        counts[key] = counts.get(key, 0) + 1
    return counts


_CACHE_HINTS = ("nc", "L1", "L2", "cs", "ca", "cg", "lu", "cv", "wb", "wt", "relaxed", "acquire", "gpu",
                "evict_last", "evict_first", "evict_normal", "L1::evict_last", "L2::cache_hint")


def _sass_instructions(cubin: bytes, capability: int) -> int:
    from triton.backends.nvidia.compiler import get_ptxas
    nvdisasm = os.path.join(os.path.dirname(get_ptxas(capability).path), "nvdisasm")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        sass = subprocess.run([nvdisasm, "-c", path], capture_output=True, text=True, check=True).stdout
    return sum(1 for line in sass.splitlines() if re.match(r"\s+/\*[0-9a-f]{4,}\*/\s+\S", line))


def report(name: str, compiled, capability: int = 90, launch: Launch | None = None) -> Report:
    ptx = compiled.asm["ptx"]
    regs, spills, stack = _ptxas_usage(ptx, capability)
    kw = launch.kwargs if launch is not None else {}
    threads = 32 * compiled.metadata.num_warps
    elements = 4 * kw["BLOCK"] * kw["C"] // threads if "BLOCK" in kw and "C" in kw else 0
    return Report(name=name, num_warps=compiled.metadata.num_warps, registers=regs, spill_bytes=spills,
                  stack_bytes=stack,
                  sass_instructions=_sass_instructions(compiled.asm["cubin"], capability), elements_per_thread=elements,
                  shared_bytes=compiled.metadata.shared,
                  barriers=len(re.findall(r"\bbar\.sync\b|\bbarrier\.sync\b", ptx)),
                  loads=_global_ops(ptx, "ld"), stores=_global_ops(ptx, "st"))


# (channels, patch size, uint8 HWC patches, network input / F dtype, channels_last): uint8 pixel
# patches at the largest and smallest patch of a 64x64 run (the kernels' compact input; today's
# pipelines hand over float32 CHW instead, the path the float32 variants compile), latents, the
# channels_last switch, and the float32 shape the bandwidth target is judged on.
VARIANTS = ((3, 64, True, torch.bfloat16, False), (3, 16, True, torch.bfloat16, False),
            (4, 32, False, torch.bfloat16, False), (3, 64, True, torch.bfloat16, True),
            (3, 64, False, torch.float32, False))


def variant_name(op, c, s, uint8, dtype, channels_last, seeded):
    return (f"{op:9s} C{c} s{s} {'u8-hwc' if uint8 else 'f32-chw'} -> {str(dtype)[6:]}"
            f"{' channels_last' if channels_last else ''} {'philox' if seeded else 'noise'}")


def training_variants(batch: int = 4):
    """(name, thunk) for every launch variant in VARIANTS: the network input and the loss with its
    gradient, each with the noise passed in and drawn in-kernel; the loss without a gradient (the
    benchmarks' no-grad call) and the noise materialiser."""
    from pdiff.kernels import build_net_input, edm_patch_loss, philox_noise
    from pdiff.kernels.edm_loss import edm_loss_fused

    def inputs(c, s, uint8):
        g = torch.Generator().manual_seed(0)
        patches = (torch.randint(0, 256, (batch, s, s, c), generator=g, dtype=torch.uint8) if uint8
                   else torch.rand((batch, c, s, s), generator=g) * 2 - 1)
        return patches, torch.rand(batch, generator=g) + 0.1, torch.randn((batch, c, s, s), generator=g)

    def net_input(c, s, uint8, dtype, cl, seeded):
        patches, sigma, noise = inputs(c, s, uint8)
        rng = dict(seed=5, images_seen=torch.tensor(7)) if seeded else dict(noise=noise)
        build_net_input(patches, sigma, torch.zeros((batch, 2), dtype=torch.int64), 64, out_dtype=dtype,
                        channels_last=cl, backend="triton", **rng)

    def loss(c, s, uint8, dtype, cl, seeded):
        patches, sigma, noise = inputs(c, s, uint8)
        F = torch.randn((batch, c, s, s)).to(dtype)
        F = F.contiguous(memory_format=torch.channels_last) if cl else F
        rng = dict(seed=5, images_seen=torch.tensor(7)) if seeded else dict(noise=noise)
        edm_patch_loss(F.requires_grad_(), patches, sigma, backend="triton", **rng)

    def loss_no_grad(c, s, uint8, dtype, cl, seeded):
        patches, sigma, noise = inputs(c, s, uint8)
        edm_loss_fused(torch.randn((batch, c, s, s)).to(dtype), patches, sigma, noise, None, 0, 0, 0.5, False)

    out = []
    for v in VARIANTS:
        for seeded in (False, True):
            out.append((variant_name("net_input", *v, seeded), functools.partial(net_input, *v, seeded)))
            out.append((variant_name("edm_loss", *v, seeded), functools.partial(loss, *v, seeded)))
    out.append((variant_name("loss_only", *VARIANTS[-1], False), functools.partial(loss_no_grad, *VARIANTS[-1], False)))
    out.append(("philox    C3 s64", lambda: philox_noise(5, 7, (batch, 3, 64, 64), "cpu")))
    return out


def compile_variants(capability: int = 90, variants=None) -> list[Report]:
    reports = []
    for name, thunk in (variants if variants is not None else training_variants()):
        with recording() as launches:
            thunk()
        if len(launches) != 1:
            raise RuntimeError(f"{name}: expected one kernel launch, recorded {len(launches)}")
        reports.append(report(name, compile_launch(launches[0], capability), capability, launches[0]))
    return reports


# ---- budgets: what a memory-bound kernel needs, held against each variant and reported

# Registers per thread: at most 128 leaves at least 4 programs of 4 warps per SM (65536 registers),
# so enough loads are in flight for a bandwidth-bound kernel. channels_last is an opt-in layout and
# has no budget.
MAX_REGISTERS = 128
# SASS instructions per element at the large float32 shape with the noise drawn in-kernel, where the
# target is 80% of copy bandwidth: the Philox + Box-Muller work must not make the kernel ALU-bound.
# H100 SXM: 132 SMs x 4 schedulers x ~1.75 GHz ~ 29.6e12 thread-instructions/s; 80% of 3.35 TB/s over
# the bytes per element (net input 4 + 4 + 8/3 coordinate bytes, loss 4 + 4 + 4) gives 251e9 and
# 223e9 elements/s, i.e. ~118 and ~133 instructions per element. The static count (which bounds the
# executed one: no loops) is held to two thirds of that, as a kernel with loads in flight seldom
# issues every cycle.
MAX_SASS_PER_ELEMENT = {"net_input": 118 * 2 / 3, "edm_loss": 133 * 2 / 3}
# Narrow (not 128-bit) global accesses allowed at float32 CHW: the per-sample scalars (sigma, the two
# offsets, the images-seen counter) and the loss's partial sum.
MAX_SCALAR_ACCESSES = {"loads": 4, "stores": 1}


def budgets(r: Report) -> list[dict]:
    """The budgets that apply to variant ``r``: {target, value, limit, met} each."""
    op = r.name.split()[0]
    out = []

    def check(what, value, limit, met):
        out.append(dict(target=f"{r.name}: {what}", value=value, limit=limit, met=bool(met)))
    if "channels_last" not in r.name:
        check("registers per thread", r.registers, MAX_REGISTERS, r.registers <= MAX_REGISTERS)
        # The noise is drawn by the thread that loads and stores its pixels, so no value crosses
        # threads: no shared-memory layout conversion, hence no barrier but the loss's final reduction.
        allowed = 2 if op in ("edm_loss", "loss_only") else 0
        check("barriers per program", r.barriers, allowed, r.barriers <= allowed)
    if op in ("net_input", "edm_loss") and "f32-chw -> float32" in r.name:
        for kind, scalars in MAX_SCALAR_ACCESSES.items():
            ops = dict(getattr(r, kind))
            vectors = ops.pop("v4.b32", 0)
            check(f"narrow global {kind} (besides 128-bit ones)", sum(ops.values()), scalars,
                  vectors > 0 and sum(ops.values()) <= scalars)
        if r.name.endswith("philox"):
            limit = round(MAX_SASS_PER_ELEMENT[op], 1)
            check("SASS instructions per element", round(r.sass_per_element(), 1), limit, r.sass_per_element() <= limit)
    if op == "net_input" and "s64 u8-hwc -> bfloat16" in r.name and "channels_last" not in r.name:
        # 8 pixels per thread: one 16-byte store of bfloat16 per plane.
        check("bytes per global store", r.access_bytes("stores"), 16, r.access_bytes("stores") >= 16)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability x10 (90: H100/H200, 80: A100)")
    ap.add_argument("--json", help="also write the reports to this JSON file")
    args = ap.parse_args(argv)
    from triton.backends.nvidia.compiler import sm_arch_from_capability
    arch = sm_arch_from_capability(args.arch)
    reports = compile_variants(args.arch)
    targets = [t for r in reports for t in budgets(r)]
    if args.json:
        import triton
        from triton.backends.nvidia.compiler import get_ptxas_version
        variants = [dict(dataclasses.asdict(r), sass_per_element=round(r.sass_per_element(), 2),
                         load_bytes=round(r.access_bytes("loads"), 2), store_bytes=round(r.access_bytes("stores"), 2))
                    for r in reports]
        with open(args.json, "w") as f:
            json.dump(dict(tool="kernels_offline", arch=arch, triton=triton.__version__,
                           ptxas=get_ptxas_version(args.arch).strip().splitlines()[-1], machine=platform.node(),
                           note="compiled without a GPU; registers and spills from ptxas -v; budgets are "
                                "reported, not asserted", variants=variants, targets=targets), f, indent=1)
    head = (f"{'variant':58s} {'warps':>5s} {'regs':>5s} {'spill':>6s} {'stack':>6s} {'smem':>6s} {'bar':>4s} "
            f"{'B/ld':>5s} {'B/st':>5s} {'SASS/el':>7s}")
    print(f"Triton kernels compiled for {arch} (no GPU needed); registers and spills from ptxas -v")
    print(head)
    print("-" * len(head))
    for r in reports:
        print(f"{r.name:58s} {r.num_warps:5d} {r.registers:5d} {r.spill_bytes:6d} {r.stack_bytes:6d} "
              f"{r.shared_bytes:6d} {r.barriers:4d} {r.access_bytes('loads'):5.1f} {r.access_bytes('stores'):5.1f} "
              f"{r.sass_per_element():7.1f}")
    missed = [t for t in targets if not t["met"]]
    print(f"\nbudgets: {len(targets) - len(missed)} of {len(targets)} met (reported, not asserted)")
    for t in missed:
        print(f"  MISSED {t['target']}: {t['value']} (budget {t['limit']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
