"""docs/benchmarks.md's results table, generated from the JSON under benchmarks/results/ (never typed by hand).

    python benchmarks/make_table.py                           # rewrite docs/benchmarks.md between the markers
    python benchmarks/make_table.py --print                   # the table on stdout only
    python benchmarks/make_table.py --summary OUTDIR [--stages FILE]
                                                              # gpu_suite.sh: OUTDIR/summary.md, printed

Each row is one benchmark result: which benchmark, its headline figure, the machine it ran on and
the date. The result files come in several shapes (bench_step, bench_train, bench_kernels,
bench_sample, bench_pipeline, bench_latent_data, `pdiff bench ...`); files of any other shape are
skipped with a note. The table sits between the lines ``<!-- results:begin -->`` and ``<!-- results:end -->``.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DOC = ROOT / "docs" / "benchmarks.md"
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
# benchmarks/kernels_offline.py's reports; results written before it moved out of kernels/ name the old module.
OFFLINE_TOOLS = ("kernels_offline", "kernels.offline")


# ---- machine and date, from whatever the file records

def machine_label(m, payload: dict | None = None) -> str:
    if payload and payload.get("tool") in OFFLINE_TOOLS:
        version = re.search(r"cuda_(\d+\.\d+)", str(payload.get("ptxas", "")))
        return f"this VM, no GPU (ptxas {version.group(1) if version else '?'})"
    if isinstance(m, str):
        return m
    if not isinstance(m, dict):
        return "?"
    if m.get("gpu"):
        return str(m["gpu"])
    cpu = m.get("cpu") or "?"
    cores = m.get("cores") or m.get("cpu_threads")
    return f"{cpu} ({cores} cores)" if cores else str(cpu)


def file_date(path: Path, payload: dict) -> str:
    m = payload.get("machine") if isinstance(payload.get("machine"), dict) else {}
    if m.get("date"):
        return str(m["date"])[:10]
    stamp = re.search(r"(20\d{2})(\d{2})(\d{2})-\d{6}", path.name)
    if stamp:
        return "-".join(stamp.groups())
    try:
        out = subprocess.run(["git", "log", "-1", "--format=%cs", "--", str(path)], cwd=ROOT, capture_output=True,
                             text=True, timeout=10).stdout.strip()
        if out:
            return out
    except (OSError, subprocess.SubprocessError):
        pass
    return datetime.fromtimestamp(path.stat().st_mtime, timezone.utc).strftime("%Y-%m-%d")


# ---- headlines per shape

def _x(v: float) -> str:
    return f"{v:.2f}x"


def _rate(v: float) -> str:
    if v >= 10000:
        return f"{v / 1000:.0f}k"
    if v >= 100:
        return f"{v:.0f}"
    return f"{v:.3g}"


def _flops(fig: dict) -> str:
    """", 12.3 TFLOP/s (MFU 4.5%)" where the result has them (results from before #14 do not)."""
    if fig.get("tflop_per_s") is None:
        return ""
    mfu = fig.get("mfu")
    return f", {fig['tflop_per_s']:.3g} TFLOP/s (MFU {'n/a' if mfu is None else f'{100 * mfu:.1f}%'})"


def step_headline(res: dict) -> str:
    c = res["schedule_cost_per_image_vs_full"]
    mode = "compiled" if res.get("compile") else "eager"
    per = res.get("per_patch_size", {})
    full = per.get(str(res.get("resolution"))) or per.get(res.get("resolution"))
    rate = f", full {_rate(full['images_per_s'])} img/s" if full else ""
    sched = res.get("schedule", {})
    sched_rate = f"; schedule {_rate(sched['images_per_s'])} img/s{_flops(sched)}" if "images_per_s" in sched else ""
    return (f"{res.get('config', '?')} {mode} {res.get('precision', '')} batch {res.get('batch_full_images', '?')}: "
            f"schedule cost/img {c['measured']:.2f} of full (speed-up {_x(1 / c['measured'])}; "
            f"FLOP model {c['flop_model']:.2f}){rate}{sched_rate}")


def train_headline(mode: str, res: dict) -> str | None:
    if "comparison" in res:
        c = res["comparison"]
        waits = [res[r]["data_wait_share"] for r in ("full", "patch") if r in res]
        return (f"{mode}: schedule cost/img {c['cost_per_image_vs_full']:.2f} of full end to end "
                f"(speed-up {_x(c['speedup_per_image_vs_full'])}; {_rate(c['patch_images_per_s'])} vs "
                f"{_rate(c['full_images_per_s'])} img/s"
                + (f"; {c['cost_per_image_vs_full_expected_mix']:.2f} at the schedule's own mix"
                   if c.get("cost_per_image_vs_full_expected_mix") else "") + "), "
                f"data wait <= {100 * max(waits):.1f}%" + _flops(res["patch"]).replace(", ", "; schedule ", 1))
    run = res.get("run") or res.get("patch") or res.get("full")
    if run:
        return f"{mode}: {_rate(run['images_per_s'])} img/s{_flops(run)}, data wait {100 * run['data_wait_share']:.1f}%"
    return None


def headlines(path: Path, p: dict) -> tuple[str, list[str]] | None:
    """(benchmark name, headline lines) for a known shape, else None."""
    name = p.get("benchmark")
    if name == "bench_kernels":
        rows = p.get("results", [])
        speed = []
        for r in rows:
            if r.get("shape") != "large" and r.get("provider") == "triton" and r.get("op") == "loss_fwbw":
                eager = next((e for e in rows if e.get("shape") == r["shape"] and e.get("op") == r["op"]
                              and e.get("provider") == "eager"), None)
                if eager:
                    speed.append(eager["gpu_ms"] / r["gpu_ms"])
        targets = p.get("targets", [])
        line = f"{sum(t.get('met', False) for t in targets)}/{len(targets)} targets met"
        if speed:
            line += f"; loss fwd+bwd {_x(statistics.median(speed))} eager at training shapes"
        large = [r for r in rows if r.get("shape") == "large" and r.get("provider") == "triton"]
        if large and p.get("copy_bandwidth_gbps"):
            line += (f"; large shapes {100 * max(r['gpu_gbps'] for r in large) / p['copy_bandwidth_gbps']:.0f}% "
                     "of copy bandwidth")
        return "bench_kernels" + (" (quick)" if p.get("quick") else ""), [line]
    if p.get("tool") in OFFLINE_TOOLS:
        v = p.get("variants", [])
        default = [r for r in v if "channels_last" not in r["name"]]
        noise = [r for r in default if r["name"].split()[0] in ("net_input", "edm_loss")
                 and r["name"].endswith("philox")]
        line = (f"{len(v)} launch variants compiled for {p.get('arch')} without a GPU: "
                f"{sum(r['spill_bytes'] for r in v)} bytes spilled, at most {max(r['registers'] for r in default)} "
                f"registers (channels_last {max((r['registers'] for r in v if r not in default), default=0)}), "
                f"in-kernel noise at most {max((r['barriers'] for r in noise), default=0)} barriers per program")
        large = [r for r in noise if "f32-chw -> float32" in r["name"] and r.get("elements_per_thread")]
        if large:
            line += (f"; float32 64 px with in-kernel noise: "
                     f"{max(r['sass_instructions'] / r['elements_per_thread'] for r in large):.0f} SASS instructions "
                     "per element")
        if p.get("targets"):
            line += f"; budgets met {sum(t['met'] for t in p['targets'])}/{len(p['targets'])}"
        return "kernels_offline (compile only)", [line]
    if name == "bench_sample":
        rows = p.get("results", [])
        lines = [f"{r['model']} {r['nfe']} NFE batch {r['batch']}: {_rate(r['images_per_s'])} img/s{_flops(r)}"
                 for r in rows if r.get("nfe") == 35]
        return "bench_sample" + (" (quick)" if p.get("quick") else ""), lines or ["no results"]
    if name == "bench_step" or (isinstance(p.get("results"), list) and p["results"]
                                and "schedule_cost_per_image_vs_full" in p["results"][0]):
        return "bench_step", [step_headline(r) for r in p["results"]] or ["no results"]
    if name == "bench_train":
        lines = [h for mode, res in p.get("modes", {}).items() if (h := train_headline(mode, res))]
        lines += [f"{e.get('mode')}: failed ({e.get('error', '')[:60]})" for e in p.get("errors", [])]
        tag = " (quick)" if p.get("quick") else ""
        return (f"bench_train{tag} {p.get('config', '')} batch {p.get('batch_full_images', '?')}",
                lines or ["no results"])
    if name == "bench_latent_data":
        lat, onl = p["latent_shards"]["results"]["schedule"], p["online_vae"]["results"]["online-vae"]
        line = (f"{p['image_resolution']}x{p['image_resolution']} images, {p['vae']['source']}: latent shards "
                f"{_rate(lat['images_per_cpu_s'])} vs pixel shards + online VAE encoding "
                f"{_rate(onl['images_per_cpu_s'])} images per CPU-s = {p['ratio_images_per_cpu_s']:.0f}x "
                f"({p['ratio_images_per_s']:.0f}x images/s); the offline encoding, once: "
                f"{p['offline_encoding']['cpu_s_per_image']:.3g} CPU-s per image")
        return "bench_latent_data" + (" (quick)" if p.get("quick") else ""), [line]
    if isinstance(name, str) and name.startswith("pdiff bench "):
        kind, res = p.get("kind"), p.get("results", {})
        tag = f"pdiff bench {kind}" + (" (quick)" if p.get("quick") else "") + f" {p.get('config', '')}"
        if kind == "data":
            s = res["results"].get("schedule", {})
            return tag, [f"{res.get('backend')} pipeline: schedule {_rate(s.get('patches_per_s', 0))} patches/s"]
        if kind == "step":
            return tag, [step_headline(res)]
        if kind in ("train", "compare"):
            return tag, [train_headline("compile" if p.get("resolved_config", {}).get("train", {}).get("compile")
                                        else "eager", res) or "no results"]
        if kind == "sample":
            return tag, [f"{res['steps']} steps batch {res['batch']}: {_rate(res['images_per_s'])} img/s{_flops(res)}"]
        if kind == "quality":
            m = res["metric"]
            final = ", ".join(f"{n} {v:.3g}" for n, v in res["final_metric"].items() if v is not None)
            lines = [f"{m['key']} at {res['budget']['per_arm']}: {final}; best {res['best_at_budget']}"]
            for name, by_axis in res["crossovers_vs_full"].items():
                found = by_axis.get("hours") or []
                lines.append(f"{name} vs full: "
                             + ("; ".join(f"crossover at {c['hours']:.3g} h, then {c['better_after']}"
                                                              for c in found) or "no crossover"))
            return tag, lines
        return None
    if name == "quality_recipes":                  # benchmarks/quality_recipes.py
        lines = []
        for dataset, recipe in dict.fromkeys((r["dataset"], r["recipe"]) for r in p["rows"]):
            arms = {}
            for r in p["rows"]:
                if (r["dataset"], r["recipe"]) == (dataset, recipe):
                    arms.setdefault(r["arm"], []).append(r["at_budget"])
            means = {arm: sum(v) / len(v) for arm, v in arms.items()}
            lines.append(f"{dataset} {recipe}: " + "; ".join(
                f"{arm} {', '.join(f'{x:.0f}' for x in v)} (mean {means[arm]:.0f})" for arm, v in arms.items())
                + f"; lowest mean {min(means, key=means.get)}")
        key = p["rows"][0]["metric"]["key"] if p["rows"] else "metric"
        return f"quality per recipe, {key} at {p['budget_cpu_hours_per_arm']:g} CPU-hours per arm (per seed)", lines
    if name == "sample_cost":
        lines = []
        for label in ("before", "after"):
            r = p[label]
            cpu = r["cpu_user_s_per_batch"] + r["cpu_sys_s_per_batch"]
            edm = r.get("edm_reference")
            lines.append(f"{label}: {r['network_evaluations']} NFE batch {r['batch']}: {_rate(r['images_per_s'])} "
                         "img/s, "
                         f"{100 * r['cpu_sys_s_per_batch'] / cpu:.0f}% system time, {cpu / r['batch']:.2f} CPU s/img"
                         + (f" (EDM's loop {_rate(edm['images_per_s'])} img/s)" if edm else ""))
        return "sample cost (pdiff bench sample)", lines
    if isinstance(p.get("rows"), list) and any("step_ms" in r for r in p["rows"]):   # bench_networks
        lines = []
        for net in dict.fromkeys(r["net"] for r in p["rows"] if "step_ms" in r):
            for prov in dict.fromkeys(r["provider"] for r in p["rows"] if r.get("net") == net and "step_ms" in r):
                rs = [r for r in p["rows"] if r.get("net") == net and r.get("provider") == prov and "step_ms" in r]
                full = max(rs, key=lambda r: r["size"])
                util = f", MFU {full['mfu']:.1%} at full size" if full.get("mfu") is not None else ""
                lines.append(f"{net} {prov}: {_rate(full['patches_per_s'])} full images/s fwd+bwd "
                             f"(batch {full['patches']}), {min(rs, key=lambda r: r['size'])['size']}px patches "
                             f"{_rate(min(rs, key=lambda r: r['size'])['patches_per_s'])}/s{util}")
        note = " (measured before later fixes, see its note)" if "BEFORE" in str(p.get("note", "")) else ""
        return "bench_networks" + note, lines
    if isinstance(p.get("results"), list) and "per_core_vs_baseline" in p:      # bench_pipeline
        rows = p["results"]
        sched = sorted((r for r in rows if r.get("config") == "schedule"), key=lambda r: -r["images_per_s"])
        line = ", ".join(f"{r['backend']}-{r['format']} {_rate(r['images_per_s'])}" for r in sched[:3])
        line = f"schedule img/s: {line}" if line else "no schedule rows"
        per_core = p.get("per_core_vs_baseline") or {}
        if per_core:
            best = max(per_core, key=per_core.get)
            line += f"; per core vs baseline loader: {best} {_x(per_core[best])}"
        lines = [line]
        before = p.get("before") or {}
        ratios = {k.split()[0]: v for k, v in before.get("per_core_ratio", {}).items() if k.endswith(" schedule")}
        if ratios:
            lines.append(f"schedule patches/s per core vs commit {before.get('commit') or '?'}: "
                         + ", ".join(f"{k} {_x(v)}" for k, v in sorted(ratios.items())))
        decode = p.get("decode_cost_region_vs_whole") or {}
        if decode:
            lines.append("Pillow decode per patch at the schedule, cut at the patch's last row vs whole: "
                         + ", ".join(f"{fmt} {v['schedule_ratio']:.2f}" for fmt, v in decode.items()))
        res = (p.get("args") or {}).get("resolution")
        commit = (p.get("machine") or {}).get("commit")
        return "bench_pipeline" + (f" {res}x{res}" if res else "") + (f" (commit {commit})" if commit else ""), lines
    return None


def collect(folder: Path) -> tuple[list[dict], list[str]]:
    rows, skipped = [], []
    for path in sorted(folder.rglob("*.json")):
        try:
            payload = json.loads(path.read_text())
            got = headlines(path, payload) if isinstance(payload, dict) else None
        except (OSError, ValueError, KeyError, TypeError, ZeroDivisionError, AttributeError) as e:
            skipped.append(f"{path.relative_to(folder)} ({type(e).__name__}: {e})")
            continue
        if got is None:
            skipped.append(f"{path.relative_to(folder)} (unknown shape)")
            continue
        bench, lines = got
        rows.append({"benchmark": bench, "result": "<br>".join(lines),
                     "machine": machine_label(payload.get("machine"), payload),
                     "date": file_date(path, payload), "file": str(path.relative_to(folder))})
    rows.sort(key=lambda r: (r["date"], r["benchmark"], r["file"]))
    return rows, skipped


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def markdown(rows: list[dict], skipped: list[str], source: str) -> str:
    out = ["| benchmark | result | machine | date |", "|---|---|---|---|"]
    out += [f"| {_cell(r['benchmark'])} | {_cell(r['result'])} | {_cell(r['machine'])} | {r['date']} |" for r in rows]
    out.append("")
    note = f"Generated by `python benchmarks/make_table.py` from {len(rows)} result file(s) in `{source}`"
    if skipped:
        note += f"; skipped {len(skipped)}: " + ", ".join(f"`{s}`" for s in skipped)
    out.append(note + ".")
    return "\n".join(out)


def write_table(doc: Path, table: str) -> None:
    text = doc.read_text()
    if BEGIN not in text or END not in text or text.index(BEGIN) > text.index(END):
        raise SystemExit(f"{doc}: no '{BEGIN}' ... '{END}' lines to put the table between; add them "
                         f"where the table belongs (the end of the Benchmarks section)")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    doc.write_text(f"{head}{BEGIN}\n{table}\n{END}{tail}")


# ---- gpu_suite.sh's summary

def summary(outdir: Path, stages: Path | None) -> str:
    lines = ["# GPU suite summary", ""]
    if stages and stages.exists():
        lines += ["| stage | status | seconds | note |", "|---|---|---|---|"]
        for row in stages.read_text().splitlines():
            parts = row.split("\t")
            if len(parts) >= 3:
                name, rc, secs = parts[:3]
                note = parts[3] if len(parts) > 3 else ""
                status = {"0": "ok", "124": "TIMEOUT", "137": "KILLED", "skip": "skipped"}.get(rc, f"FAILED (rc {rc})")
                lines.append(f"| {name} | {status} | {secs} | {_cell(note)} |")
        lines.append("")
    rows, skipped = collect(outdir)
    lines.append(markdown(rows, skipped, str(outdir)))
    missed = []
    for path in sorted(outdir.rglob("*.json")):
        try:
            p = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        for t in p.get("targets", []) if isinstance(p, dict) else []:
            if isinstance(t, dict) and not t.get("met", True):
                missed.append(f"- {path.name}: {t.get('target')}: {t.get('value')}")
    lines += ["", f"Targets missed: {len(missed)}" + (":" if missed else "")] + missed
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", default=str(RESULTS), help="folder of result JSON (searched recursively)")
    ap.add_argument("--doc", "--readme", dest="doc", default=str(DOC),
                    help="the Markdown file whose table is rewritten")
    ap.add_argument("--print", action="store_true", help="print the table, leave the file alone")
    ap.add_argument("--summary", metavar="OUTDIR", help="write OUTDIR/summary.md (gpu_suite.sh) and print it")
    ap.add_argument("--stages", default=None, help="with --summary: the suite's stage statuses (TSV)")
    args = ap.parse_args(argv)
    if args.summary:
        out = Path(args.summary)
        text = summary(out, Path(args.stages) if args.stages else None)
        (out / "summary.md").write_text(text)
        print(text)
        return 0
    folder = Path(args.results)
    rows, skipped = collect(folder)
    try:
        source = str(folder.resolve().relative_to(ROOT))
    except ValueError:
        source = str(folder)
    table = markdown(rows, skipped, source + "/")
    for s in skipped:
        print(f"make_table: skipped {s}", file=sys.stderr)
    if args.print:
        print(table)
        return 0
    write_table(Path(args.doc), table)
    print(f"make_table: {len(rows)} row(s) written to {args.doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
