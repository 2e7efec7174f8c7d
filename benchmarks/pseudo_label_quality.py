"""Quality of the lattice pseudo-labels against the simulator's ground truth, and their speed.

    nice -n 19 .venv/bin/python benchmarks/pseudo_label_quality.py [--seed 4242]
        [--images-per-class 100] [--size 256] [--dose-bins 3] [--out PATH]
    .venv/bin/python benchmarks/pseudo_label_quality.py --table-only [PATH]

A held-out synthetic set: the simulator's default SimulationConfig, every material and every
label it declares (bulk included), --images-per-class images of each (material, label) pair
in plan_dataset's balanced order, image i drawn from seed_for(seed, i). The default seed is
used by no pipeline profile. components.pseudo_labels.lattice.pseudo_labels sees the image
only; its masks are then scored against the simulator's masks:

- pixel level, per class, pooled over images (tp, fp, fn summed; lattice.quality's
  conventions, nan written as null): precision, recall and IoU, over all images, per
  material and per dose bin (log-spaced over the configured dose range); and over the images
  of that class alone (`per_label.<class>.own_class`);
- image level, per label: the fraction of its images in which each channel holds any
  pseudo-mask pixel (`flag_rate`); the detection rate of class X is the flag rate of X on
  images of class X, `hit_rate` asks for overlap with the true mask too, and the false-alarm
  rate is the fraction of bulk images with any pseudo-mask pixel. Images flagged with a class
  they do not hold and images whose class was missed are listed with their seed.

Throughput: pseudo_labels alone, in this single process with BLAS held to one thread, so
images/s is images/s per core. The machine's state (load, a fixed NumPy workload) is
recorded as in synthesis_throughput.py: compare numbers from the same machine only.

--table-only prints the Markdown tables (for the README) from an existing JSON file.
"""

import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"  # before NumPy loads BLAS

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from components.materials import substitution_contrast  # noqa: E402
from components.defects import BULK_LABEL, DEFECT_CLASSES  # noqa: E402
from machine import (calibration, dose_bin, dose_edges, fmt, git_commit,  # noqa: E402  (benchmarks/machine.py)
                     print_tables, write_report)
from components.pseudo_labels.lattice import (  # noqa: E402
    PseudoLabelConfig,
    pseudo_labels,
    quality,
)
from components.synthesis.simulator import (  # noqa: E402
    SimulationConfig,
    applicable_labels,
    plan_dataset,
    seed_for,
    simulate_image,
)

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results", "pseudo_label_quality.json")
MATERIALS = ("SrTiO3", "CdTe")
DEFAULT_SEED = 4242  # no pipeline profile uses it (they use 20261125)






def scores(tp, fp, fn) -> dict:
    """Per class precision, recall, IoU from pooled counts (lattice.quality's conventions)."""
    out = {}
    for c, name in enumerate(DEFECT_CLASSES):
        a, b, m = int(tp[c]), int(fp[c]), int(fn[c])
        out[name] = {
            "precision": a / (a + b) if a + b else None,
            "recall": a / (a + m) if a + m else None,
            "iou": a / (a + b + m) if a + b + m else None,
            "tp": a, "fp": b, "fn": m,
        }
    return out


def summarise(records: list) -> dict:
    """Pixel-level scores per class and image-level rates per label, over `records`."""
    if not records:
        return {"images": 0}
    tp = np.sum([r["tp"] for r in records], axis=0)
    fp = np.sum([r["fp"] for r in records], axis=0)
    fn = np.sum([r["fn"] for r in records], axis=0)
    out = {"images": len(records), "pixel": scores(tp, fp, fn), "per_label": {}}
    for label in (BULK_LABEL,) + DEFECT_CLASSES:
        group = [r for r in records if r["label"] == label]
        if not group:
            continue
        flag = {name: float(np.mean([name in r["flagged"] for r in group]))
                for name in DEFECT_CLASSES}
        entry = {
            "images": len(group),
            "any_flag_rate": float(np.mean([bool(r["flagged"]) for r in group])),
            "flag_rate": flag,
        }
        if label == BULK_LABEL:
            entry["false_alarm_rate"] = entry["any_flag_rate"]
        else:
            c = DEFECT_CLASSES.index(label)
            entry["own_class"] = scores(*(np.sum([r[k] for r in group], axis=0)
                                          for k in ("tp", "fp", "fn")))[label]
            entry["detection_rate"] = flag[label]
            entry["hit_rate"] = float(np.mean([r["tp"][c] > 0 for r in group]))
            entry["other_class_flag_rate"] = float(
                np.mean([any(n != label for n in r["flagged"]) for r in group]))
        out["per_label"][label] = entry
    bulk = out["per_label"].get(BULK_LABEL)
    out["bulk_false_alarm_rate"] = None if bulk is None else bulk["false_alarm_rate"]
    return out


def _image_ref(r: dict) -> dict:
    return {k: r[k] for k in ("index", "seed", "material", "label", "dose", "flagged")}


def evaluate(seed: int, images_per_class: int, config: SimulationConfig, materials,
             labels, edges: np.ndarray, progress: bool = True) -> tuple[list, dict]:
    """Simulate the held-out set, pseudo-label it; per-image records and the timings."""
    pairs = sum(len([lab for lab in applicable_labels(m) if labels is None or lab in labels])
                for m in materials)
    plan = plan_dataset(images_per_class * pairs, materials, seed, labels)
    teacher = PseudoLabelConfig()
    # warm lazy imports and caches on an image that is not scored
    warm = simulate_image(plan[0][1], plan[0][2], seed_for(seed + 1, 0), config)
    try:
        pseudo_labels(warm.image, teacher)
    except ValueError:
        pass
    records, label_s, label_cpu_s, simulate_s = [], [], [], 0.0
    start = time.perf_counter()
    for n, (index, material, label, _) in enumerate(plan):
        t0 = time.perf_counter()
        sim = simulate_image(material, label, seed_for(seed, index), config)
        simulate_s += time.perf_counter() - t0
        wall, cpu = time.perf_counter(), time.process_time()
        error = None
        try:
            # the image and its material's substituent contrast (as the pipeline), never sim.mask
            mask = pseudo_labels(sim.image, teacher, substitution_contrast(material)).mask
        except ValueError as exc:  # no lattice found: scored as an empty mask
            mask, error = np.zeros_like(sim.mask), str(exc)
        label_s.append(time.perf_counter() - wall)
        label_cpu_s.append(time.process_time() - cpu)
        q = quality(mask, sim.mask)
        records.append({
            "index": index,
            "seed": [seed, index],
            "material": material,
            "label": label,
            "dose": round(sim.dose, 1),
            "dose_bin": dose_bin(sim.dose, edges),
            "thickness_nm": round(sim.thickness_nm, 2),
            "flagged": [c for c in DEFECT_CLASSES if q[c]["tp"] + q[c]["fp"]],
            "tp": [q[c]["tp"] for c in DEFECT_CLASSES],
            "fp": [q[c]["fp"] for c in DEFECT_CLASSES],
            "fn": [q[c]["fn"] for c in DEFECT_CLASSES],
            "seconds": round(label_s[-1], 4),
            "error": error,
        })
        if progress and (n + 1) % 50 == 0:
            print(f"  {n + 1}/{len(plan)} images, {time.perf_counter() - start:.0f} s", flush=True)
    times = {
        "images": len(records),
        "simulate_s_total": simulate_s,
        "pseudo_labels_s_total": float(np.sum(label_s)),
        "pseudo_labels_cpu_s_total": float(np.sum(label_cpu_s)),
        "s_per_image_median": float(np.median(label_s)),
        "s_per_image_mean": float(np.mean(label_s)),
        "s_per_image_max": float(np.max(label_s)),
        "images_per_s_per_core": len(records) / float(np.sum(label_s)),
        "images_per_cpu_s": len(records) / max(float(np.sum(label_cpu_s)), 1e-12),
        "s_per_image_median_by_material": {
            m: float(np.median([t for t, r in zip(label_s, records) if r["material"] == m]))
            for m in materials},
    }
    return records, times


def build_report(seed, images_per_class, size, bins, materials=MATERIALS, labels=None,
                 progress=True) -> dict:
    config = SimulationConfig(size=size)
    edges = dose_edges(config, bins)
    started = time.perf_counter()
    before = calibration()
    records, times = evaluate(seed, images_per_class, config, tuple(materials), labels, edges,
                              progress)
    report = {
        "description": "lattice pseudo-labels vs simulator ground truth on a held-out set",
        "settings": {
            "seed": seed,
            "image_seeds": "numpy SeedSequence([seed, index])",
            "images_per_class": images_per_class,
            "materials": list(materials),
            "labels": None if labels is None else list(labels),
            "size": size,
            "dose_bin_edges": [float(e) for e in edges],
            "simulation_config": dataclasses.asdict(config),
            "pseudo_label_config": dataclasses.asdict(PseudoLabelConfig()),
            **git_commit(),
        },
        "calibration_before": before,
        "overall": summarise(records),
        "by_material": {m: summarise([r for r in records if r["material"] == m])
                        for m in materials},
        "by_dose": [
            {"dose_range": [float(edges[b]), float(edges[b + 1])],
             **summarise([r for r in records if r["dose_bin"] == b])}
            for b in range(bins)
        ],
        "false_alarms_on_bulk": [_image_ref(r) for r in records
                                 if r["label"] == BULK_LABEL and r["flagged"]],
        "wrong_class_flags": [_image_ref(r) for r in records if r["label"] != BULK_LABEL
                              and any(c != r["label"] for c in r["flagged"])],
        "missed": [_image_ref(r) for r in records
                   if r["label"] != BULK_LABEL and r["label"] not in r["flagged"]],
        "errors": [{**_image_ref(r), "error": r["error"]} for r in records if r["error"]],
        "throughput": times,
        "calibration_after": calibration(),
    }
    report["wall_s"] = time.perf_counter() - started
    report["images"] = records
    return report


def tables(report: dict) -> str:
    """Markdown: the per-class table, then IoU by material and by dose bin."""
    overall, s = report["overall"], report["settings"]
    per_label = overall["per_label"]
    lines = [
        f"Pseudo-labels vs ground truth: {overall['images']} held-out images "
        f"({s['images_per_class']} per material and label, {', '.join(s['materials'])}, "
        f"{s['size']} x {s['size']}, seed {s['seed']}); pixels pooled over all images.",
        "",
        "| class | precision | recall | IoU | detection rate |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name in DEFECT_CLASSES:
        p = overall["pixel"][name]
        entry = per_label.get(name)
        if entry is None:
            continue
        lines.append(f"| {name} | {fmt(p['precision'])} | {fmt(p['recall'])} | {fmt(p['iou'])} "
                     f"| {fmt(entry['detection_rate'])} ({entry['images']} images) |")
    bulk = per_label.get(BULK_LABEL)
    if bulk is not None:
        lines.append(f"| bulk (false alarms) | | | | {fmt(bulk['false_alarm_rate'])} flagged "
                     f"({bulk['images']} images) |")
    names = [n for n in DEFECT_CLASSES if n in per_label]
    lines += ["", "IoU by material and dose (e/Å²):", "",
              "| subset | images | " + " | ".join(names) + " | bulk false alarms |",
              "| --- | --- | " + " | ".join("---" for _ in names) + " | --- |"]
    subsets = [(m, part) for m, part in report["by_material"].items()]
    subsets += [(f"dose {lo:.0f}–{hi:.0f}", part) for part in report["by_dose"]
                for lo, hi in [part["dose_range"]]]
    for title, part in subsets:
        if not part.get("images"):
            lines.append(f"| {title} | 0 | " + " | ".join("–" for _ in names) + " | – |")
            continue
        cells = [fmt(part["pixel"][n]["iou"]) if n in part["per_label"] else "–" for n in names]
        lines.append(f"| {title} | {part['images']} | " + " | ".join(cells)
                     + f" | {fmt(part['bulk_false_alarm_rate'])} |")
    t = report["throughput"]
    load = report["calibration_before"]["loadavg_1_5_15"]
    lines += ["", f"Throughput of pseudo_labels, one core: {t['images_per_s_per_core']:.1f} "
              f"images/s (median {1e3 * t['s_per_image_median']:.0f} ms, mean "
              f"{1e3 * t['s_per_image_mean']:.0f} ms per image; load average {load[0]:.2f} on "
              f"{report['calibration_before']['cpu_count']} cores)."]
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--images-per-class", type=int, default=100,
                        help="images per (material, label) pair")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--dose-bins", type=int, default=3,
                        help="log-spaced bins over the simulator's dose range")
    parser.add_argument("--materials", nargs="+", default=list(MATERIALS))
    parser.add_argument("--labels", nargs="+", default=None,
                        help="image labels to simulate (default: every label of each material)")
    parser.add_argument("--out", default=RESULTS)
    parser.add_argument("--table-only", nargs="?", const=RESULTS, default=None, metavar="PATH",
                        help="print the Markdown tables from an existing JSON and exit")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)

    if args.table_only is not None:
        return print_tables(args.table_only, tables)
    if args.images_per_class < 1 or args.dose_bins < 1:
        parser.error("--images-per-class and --dose-bins must be >= 1")

    report = build_report(args.seed, args.images_per_class, args.size, args.dose_bins,
                          args.materials, args.labels, progress=not args.quiet)
    write_report(report, args.out)
    if not args.quiet:
        print(tables(report))
        for key in ("false_alarms_on_bulk", "wrong_class_flags", "missed", "errors"):
            items = report[key]
            print(f"\n{key}: {len(items)}")
            for r in items[:20]:
                print(f"  index {r['index']} (seed {r['seed']}) {r['material']} {r['label']}, "
                      f"dose {r['dose']:.0f}: flagged {r['flagged']}"
                      + (f", error {r['error']}" if r.get("error") else ""))
            if len(items) > 20:
                print(f"  ... {len(items) - 20} more in the JSON")
        print(f"\nwall time {report['wall_s']:.1f} s; results in {args.out}")
    return report


if __name__ == "__main__":
    main()
