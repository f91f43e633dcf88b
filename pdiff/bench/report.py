"""The tables the benchmark commands print."""
from __future__ import annotations


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _mfu(x: float | None) -> str:
    return "n/a" if x is None else _pct(x)


def _tflops(x: float | None) -> str:
    return "-" if x is None else f"{x:.3g}"


def print_data(res: dict) -> None:
    print(f"pipeline ({res['backend']}, {res['workers']} workers), batch {res['batch']} full images")
    if res.get("vae"):
        print(f"every batch encoded by the VAE {res['vae']['source']} ({res['resolution']}x{res['resolution']} images "
              f"-> {res['latent_resolution']}x{res['latent_resolution']} latents)")
    print(f"{'plan':>10} {'patches/step':>12} {'patches/s':>11} {'images/s':>10} {'ms/step':>9} {'images/CPU-s':>13}")
    for label, v in res["results"].items():
        pps = "-" if v["patches_per_step"] is None else v["patches_per_step"]
        per_cpu = "-" if not v.get("images_per_cpu_s") else f"{v['images_per_cpu_s']:.4g}"
        print(f"{label:>10} {pps!s:>12} {v['patches_per_s']:>11.4g} {v['images_per_s']:>10.4g} "
              f"{v['ms_per_step']:>9.2f} "
              f"{per_cpu:>13}")


def print_step(res: dict) -> None:
    print(f"{res['config']} ({res['parameters']:,} params), {res['precision']}, compile={res['compile']}, "
          f"kernels {res['kernels']}, batch {res['batch_full_images']} full images")
    print(f"{'patch':>6} {'patches':>8} {'ms/step':>10} {'images/s':>10} {'ms/image':>9} {'TFLOP/s':>8} {'MFU':>6}")
    for s, v in res["per_patch_size"].items():
        print(f"{s:>6} {v['patches']:>8} {v['ms_per_step']:>10.2f} {v['images_per_s']:>10.1f} "
              f"{v['ms_per_image']:>9.3f} "
              f"{_tflops(v.get('tflop_per_s')):>8} {_mfu(v.get('mfu')):>6}")
    sc = res["schedule"]
    print(f"{'sched':>6} {'':>8} {sc['ms_per_step']:>10.2f} {sc['images_per_s']:>10.1f} {sc['ms_per_image']:>9.3f} "
          f"{_tflops(sc.get('tflop_per_s')):>8} {_mfu(sc.get('mfu')):>6}")
    if res.get("card"):
        print(f"MFU against one {res['card']} ({res['peak_tflops']:g} TFLOP/s dense {res['precision']})")
    print(f"schedule ({sc['mode']}) cost per image vs full images: measured {sc['cost_per_image_vs_full']:.3f} "
          f"(speed-up {sc['speedup_per_image_vs_full']:.2f}x), FLOP model "
          f"{res['flop_model']['cost_per_image_vs_full']:.3f}")


def print_train(res: dict) -> None:
    runs = {k: v for k, v in res.items() if k in ("full", "patch", "run")}
    print(f"{'run':>6} {'images/s':>10} {'ms/image':>9} {'ms/step':>9} {'TFLOP/s':>8} {'MFU':>6} {'data wait':>10} "
          f"{'peak GB':>8} {'intervals':>9}")
    for name, v in runs.items():
        peak = "-" if v["peak_memory_gb"] is None else f"{v['peak_memory_gb']:.2f}"
        print(f"{name:>6} {v['images_per_s']:>10.1f} {v['ms_per_image']:>9.3f} {v['ms_per_step']:>9.2f} "
              f"{_tflops(v.get('tflop_per_s')):>8} {_mfu(v.get('mfu')):>6} "
              f"{_pct(v['data_wait_share']):>10} {peak:>8} {v['intervals']:>9}")
    if "comparison" in res:
        c = res["comparison"]
        print("patch schedule vs full-image EDM, measured end to end: cost per image "
              f"{c['cost_per_image_vs_full']:.3f} "
              f"of full images (speed-up {c['speedup_per_image_vs_full']:.2f}x)")
        if c.get("cost_per_image_vs_full_expected_mix"):
            steps = res["patch"]["steps_by_patch_size"]
            print(f"  with the schedule's probabilities in place of the sizes drawn ({steps}): "
                  f"{c['cost_per_image_vs_full_expected_mix']:.3f} of full images")


def print_sample(res: dict) -> None:
    print(f"{res['config']} ({res['parameters']:,} params), {res['canvas']}x{res['canvas']}, {res['steps']} steps "
          f"({res['network_evaluations']} network evaluations), batch {res['batch']}: "
          f"{_tflops(res.get('tflop_per_s'))} TFLOP/s, MFU {_mfu(res.get('mfu'))}")
    print(f"{'sampler':>14} {'images/s':>9} {'s/batch':>8} {'user s':>8} {'sys s':>7} {'sys share':>9} {'faults':>9}")
    rows = [("pdiff", res)] + ([("EDM reference", res["edm_reference"])] if "edm_reference" in res else [])
    for name, v in rows:
        cpu = v["cpu_user_s_per_batch"] + v["cpu_sys_s_per_batch"]
        print(f"{name:>14} {v['images_per_s']:>9.2f} {v['seconds_per_batch']:>8.2f} {v['cpu_user_s_per_batch']:>8.2f} "
              f"{v['cpu_sys_s_per_batch']:>7.2f} {_pct(v['cpu_sys_s_per_batch'] / max(cpu, 1e-9)):>9} "
              f"{v['minor_faults_per_batch']:>9.0f}")
    if "speedup_vs_edm_reference" in res:
        print(f"pdiff's sampler vs EDM's reference loop on the same network: {res['speedup_vs_edm_reference']:.2f}x")


def print_quality(res: dict) -> None:
    m, axis = res["metric"], res["table_axis"]
    print(f"\n{m['name']} (lower is better) at equal {axis} ({res['budget']['per_arm']}; hours = "
          f"{res['hours_measure']})")
    print(f"  {m['description']}")
    names = [a["name"] for a in res["arms"]]
    print(f"{axis:>12} " + " ".join(f"{n:>20}" for n in names))
    for row in res["table"]:
        cells = " ".join(f"{'-' if row[n] is None else format(row[n], '.4f'):>20}" for n in names)
        print(f"{row[axis]:>12.4g} {cells}")
    for name, by_axis in res["crossovers_vs_full"].items():
        for key, found in by_axis.items():
            if found:
                text = "; ".join(f"at {c[key]:.4g} {key} ({m['key']} {c['metric']:.4f}), then {c['better_after']} is "
                                 "better"
                                 for c in found)
            else:
                text = "none in the common range"
            print(f"crossover {name} vs {names[0]} in {key}: {text}")
    print(f"best at the end of the budget: {res['best_at_budget']}")
