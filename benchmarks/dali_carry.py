"""Carry NVIDIA DALI to a GPU machine without a package index, in parts small enough for one transfer
each.

DALI's wheel (~200 MB) and the packages it needs that the GPU image lacks are larger than what one
transfer to that machine may carry (64 MiB with the working tree). Here, with PyPI: fetch the wheels,
split their bytes into parts under an ignored folder (.dali/), and print the commands to run there, one
transfer each. There: each run brings one part (with the small manifest) and checks it; parts brought
earlier stay on the machine while it is held (they are ignored paths), so the last run joins them,
checks every wheel against its sha256 and installs them with pip into a folder that
benchmarks/gpu_suite.sh puts on PYTHONPATH.

    python benchmarks/dali_carry.py fetch        # here: pip download (cp312, x86_64 manylinux) into .dali/wheels
    python benchmarks/dali_carry.py split        # here: .dali/part-NN (< 64 MiB with the tree) and .dali/manifest.json
    python benchmarks/dali_carry.py plan         # here: the runs to make there, in order (--json for a list)
    python3 benchmarks/dali_carry.py check       # there, in each run: the parts that arrived are whole
    python3 benchmarks/dali_carry.py install     # there, last run: join, verify, pip install --target /tmp/pdiff-dali

Only the standard library is used, so the script runs on the GPU machine before anything is
installed. The GPU image (Python 3.12, torch 2.11 + CUDA 13, numpy, packaging, six, pyyaml, typing-
extensions) has the rest of DALI's requirements.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DIR = ".dali"                      # relative to the repository root; ignored by git (.gitignore)
TARGET = "/tmp/pdiff-dali"         # where `install` puts the packages (gpu_suite.sh looks there)
# DALI for CUDA 13 and what it needs that the GPU image does not have. libcst, optree and nvtx are
# compiled (cp312 wheels); nvimgcodec[nvjpeg] is DALI's image codec with the nvJPEG GPU decoder.
PACKAGES = ["nvidia-dali-cuda130==2.4.0", "nvidia-nvimgcodec-cu13==0.9.0.20", "nvidia-nvjpeg==13.3.2.43",
            "nvidia-libnvcomp-cu13==5.3.0.16", "astunparse==1.6.3", "gast==0.7.0", "libcst==1.9.0",
            "makefun==1.16.0", "optree==0.20.0", "nvtx==0.2.17"]
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64"]
CALL_LIMIT = 64 * 2 ** 20          # what one device call carries: the working tree and the carried paths
PART_BYTES = 56 * 2 ** 20          # leaves room for the working tree
MANIFEST = "manifest.json"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch(folder: Path, packages=PACKAGES) -> list[Path]:
    """pip download the wheels for the GPU machine (Python 3.12, x86_64) into folder/wheels."""
    wheels = folder / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
           "--implementation", "cp", "-d", str(wheels)]
    for p in PLATFORMS:
        cmd += ["--platform", p]
    subprocess.run(cmd + list(packages), check=True)
    return sorted(wheels.glob("*.whl"))


def split(wheels: list[Path], folder: Path, part_bytes: int = PART_BYTES) -> dict:
    """The wheels' bytes, one after the other, cut into parts of at most ``part_bytes``; the manifest
    records each wheel (name, size, sha256, in stream order) and each part (name, size, sha256)."""
    if not wheels:
        raise SystemExit("dali_carry: no wheels to split (run `python benchmarks/dali_carry.py fetch` first)")
    for old in folder.glob("part-*"):
        old.unlink()
    entries = [{"name": w.name, "bytes": w.stat().st_size, "sha256": sha256(w)} for w in wheels]
    parts, out, written, index = [], None, 0, 0

    def close_part():
        nonlocal out
        if out is not None:
            out.close()
            path = folder / parts[-1]["name"]
            parts[-1].update(bytes=path.stat().st_size, sha256=sha256(path))
            out = None
    for w in wheels:
        with open(w, "rb") as f:
            while True:
                if out is None:
                    index += 1
                    parts.append({"name": f"part-{index:02d}"})
                    out, written = open(folder / parts[-1]["name"], "wb"), 0
                block = f.read(min(1 << 20, part_bytes - written))
                if not block:
                    break
                out.write(block)
                written += len(block)
                if written == part_bytes:
                    close_part()
    close_part()
    if parts and parts[-1]["bytes"] == 0:       # the last wheel ended exactly on a part boundary
        (folder / parts.pop()["name"]).unlink()
    manifest = {"kind": "pdiff-dali-carry", "wheels": entries, "parts": parts, "target": TARGET}
    tmp = folder / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(tmp, folder / MANIFEST)
    return manifest


def load_manifest(folder: Path) -> dict:
    path = folder / MANIFEST
    if not path.exists():
        raise SystemExit(f"dali_carry: {path} is missing: carry {DIR}/{MANIFEST} with every call "
                         f"(made by `python benchmarks/dali_carry.py split`)")
    return json.loads(path.read_text())


def check(folder: Path) -> tuple[list[str], list[str], list[str]]:
    """(whole parts, parts not here yet, damaged parts); prints what is missing or damaged."""
    m = load_manifest(folder)
    whole, missing, damaged = [], [], []
    for p in m["parts"]:
        path = folder / p["name"]
        if not path.exists():
            missing.append(p["name"])
        elif path.stat().st_size != p["bytes"] or sha256(path) != p["sha256"]:
            damaged.append(p["name"])
            print(f"  {p['name']}: DAMAGED ({path.stat().st_size} of {p['bytes']} bytes, or a wrong sha256): carry it "
                  "again")
        else:
            whole.append(p["name"])
    print(f"dali_carry: {len(whole)} of {len(m['parts'])} parts here and whole"
          + (f"; still to carry: {', '.join(missing + damaged)}" if missing or damaged else ""))
    return whole, missing, damaged


def join(folder: Path) -> list[Path]:
    """The wheels from the parts, each checked against its size and sha256, in folder/wheels."""
    m = load_manifest(folder)
    _, missing, damaged = check(folder)
    if missing or damaged:
        raise SystemExit(f"dali_carry: cannot join: {', '.join(missing + damaged)} missing or damaged")
    out_dir = folder / "wheels"
    out_dir.mkdir(exist_ok=True)
    parts = iter(m["parts"])
    current, left = None, 0
    wheels = []
    for w in m["wheels"]:
        dest = out_dir / w["name"]
        need = w["bytes"]
        with open(dest, "wb") as out:
            while need:
                if left == 0:
                    if current:
                        current.close()
                    p = next(parts)
                    current, left = open(folder / p["name"], "rb"), p["bytes"]
                block = current.read(min(need, left, 1 << 20))
                out.write(block)
                need -= len(block)
                left -= len(block)
        if sha256(dest) != w["sha256"]:
            raise SystemExit(f"dali_carry: {dest} does not match its sha256 after joining; split again here")
        wheels.append(dest)
    if current:
        current.close()
    return wheels


def install(folder: Path, target: str, check_import: str = "nvidia.dali", dry_run: bool = False) -> int:
    wheels = join(folder)
    print(f"dali_carry: {len(wheels)} wheels joined and verified ({sum(w.stat().st_size for w in wheels) / 2**20:.0f} "
          "MiB)")
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
           "--upgrade", "--target", target, *map(str, wheels)]
    if dry_run:
        print("dali_carry: would run " + " ".join(cmd[:12]) + " ...")
        return 0
    subprocess.run(cmd, check=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [target, os.environ.get("PYTHONPATH")]))}
    probe = subprocess.run([sys.executable, "-c",
                            f"import {check_import} as m; print(m.__name__, getattr(m, '__version__', ''))"],
                           env=env, capture_output=True, text=True)
    if probe.returncode != 0:
        print(probe.stderr[-2000:], file=sys.stderr)
        raise SystemExit(f"dali_carry: installed into {target}, but `import {check_import}` fails there")
    print(f"dali_carry: installed into {target}: {probe.stdout.strip()} "
          f"(benchmarks/gpu_suite.sh puts {target} on PYTHONPATH when it holds nvidia/dali)")
    return 0


def tree_bytes() -> int:
    """What a device call sends besides the carried paths: tracked and untracked, not ignored, files."""
    out = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         capture_output=True, check=True).stdout
    return sum((ROOT / p).stat().st_size for p in out.decode().split("\0") if p and (ROOT / p).is_file())


def plan(folder: Path, suite_cmd: str | None) -> list[dict]:
    """The device calls, in order: one per part (carrying it and the manifest), the last also joining
    and installing, then (optionally) running the suite, all while the machine stays warm."""
    m = load_manifest(folder)
    rel = folder.relative_to(ROOT) if folder.is_relative_to(ROOT) else folder
    calls = []
    for i, p in enumerate(m["parts"]):
        last = i == len(m["parts"]) - 1
        cmd = f"python3 benchmarks/dali_carry.py check --dir {rel} --part {p['name']}"
        if last:
            cmd = f"python3 benchmarks/dali_carry.py install --dir {rel}"
            if suite_cmd:
                cmd += f" && {suite_cmd}"
        calls.append({"carry": [f"{rel}/{MANIFEST}", f"{rel}/{p['name']}"], "command": cmd,
                      "bytes": p["bytes"] + (folder / MANIFEST).stat().st_size})
    return calls


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("action", choices=["fetch", "split", "plan", "check", "install"])
    ap.add_argument("--dir", default=DIR, help=f"the parts' folder, relative to the repository root (default {DIR})")
    ap.add_argument("--part-bytes", type=int, default=PART_BYTES, help="split: bytes per part (default 56 MiB)")
    ap.add_argument("--target", default=TARGET, help=f"install: pip --target folder (default {TARGET})")
    ap.add_argument("--check-import", default="nvidia.dali", help="install: the module that must import afterwards")
    ap.add_argument("--part", default=None, help="check: the part this call carried (it must be whole)")
    ap.add_argument("--dry-run", action="store_true", help="install: join and verify, do not run pip")
    ap.add_argument("--suite", default=None, help="plan: a command for the last call to run after installing")
    ap.add_argument("--json", action="store_true", help="plan: print the calls as JSON")
    args = ap.parse_args(argv)
    folder = Path(args.dir)
    folder = folder if folder.is_absolute() else ROOT / folder
    folder.mkdir(parents=True, exist_ok=True)
    if args.action == "fetch":
        wheels = fetch(folder)
        print(f"dali_carry: {len(wheels)} wheels, {sum(w.stat().st_size for w in wheels) / 2**20:.0f} MiB in "
              f"{folder / 'wheels'}")
    elif args.action == "split":
        m = split(sorted((folder / "wheels").glob("*.whl")), folder, args.part_bytes)
        print(f"dali_carry: {len(m['wheels'])} wheels in {len(m['parts'])} parts of at most "
              f"{args.part_bytes / 2**20:.0f} MiB in {folder}; next: python benchmarks/dali_carry.py plan")
    elif args.action == "plan":
        calls = plan(folder, args.suite)
        tree = tree_bytes()
        too_big = [c for c in calls if c["bytes"] + tree > CALL_LIMIT]
        if args.json:
            print(json.dumps([{"carry": c["carry"], "command": c["command"]} for c in calls], indent=1))
        else:
            print(f"{len(calls)} device calls, one after the other while the machine stays warm "
                  f"(the working tree sends {tree / 2**20:.1f} MiB with each):")
            for i, c in enumerate(calls, 1):
                print(f"  {i}. run(carry={json.dumps(c['carry'])}, command={json.dumps(c['command'])})")
        if too_big:
            print(f"dali_carry: {len(too_big)} call(s) would carry more than 64 MiB with the tree; split with a "
                  "smaller "
                  f"--part-bytes", file=sys.stderr)
            return 1
    elif args.action == "check":
        whole, _, damaged = check(folder)
        if args.part and args.part not in whole:
            print(f"dali_carry: {args.part} did not arrive whole; run this call again", file=sys.stderr)
            return 1
        return 1 if damaged else 0
    else:
        return install(folder, args.target, args.check_import, args.dry_run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
