"""Compare two runs of the benchmarks: every number old -> new, and the regressions flagged.

    .venv/bin/python -m benchmarks.compare OLD.json NEW.json [--tolerance 0.05]
        [--time-tolerance 0.25] [--calibration-ratio 1.25] [--changed-only] [--match REGEX]
        [--max-list 30]
    .venv/bin/python -m benchmarks.compare OLD_DIR NEW_DIR   (every *.json the folders share)

Each file is flattened to dotted keys of its numbers (`overall.pixel.vacancy.iou`, list
entries by position: `measurements.3.seconds`). Lists longer than --max-list (per-image
records) are left out and named, so the table holds the summaries. Which way is better comes
from the key's words:
- higher: a throughput, where the key's last named part holds `per_s`, `per_cpu_s`,
  `throughput` or `speedup` (`images_per_s_per_core`);
- lower: a cost, where any part of the key has the word `seconds`, `s`, `ms`, `mib`, `gib`,
  `rss` or `memory` (`seconds.kmeans_per_k.3`, `wall_s`, `peak_mib`);
- higher: a score, where the last named part ends in accuracy, iou, silhouette, ari, nmi, f1,
  precision, recall, detection_rate or hit_rate; lower: in loss or false_alarm_rate;
- anything else (counts, settings, k) is shown without a direction.
A number that moves the wrong way by more than the tolerance, relative to the old value
(--time-tolerance for costs and throughputs, --tolerance for scores), is a regression.
Keys under `settings`, `calibration*` and `threadpools`, and load averages, are context:
never regressions.

Timings compare only on one machine under a similar load. Every benchmark records the
seconds of a fixed NumPy workload (machine.calibration); where the two runs' differ by more
than --calibration-ratio, or their machines or core counts differ, the table says so and
timing regressions are shown but do not count.

Exit status: 0 without regressions, 1 with any, 2 for unusable arguments.

To rerun everything for a comparison, snapshot the results first (the scripts write into
benchmarks/results/), then run each script as the README gives it and compare:

    cp -r benchmarks/results /tmp/results_before
    nice -n 19 .venv/bin/python benchmarks/synthesis_throughput.py        # about a minute
    nice -n 19 .venv/bin/python benchmarks/pseudo_label_quality.py        # about a minute
    nice .venv/bin/python benchmarks/segmentation_quality.py              # about 4 minutes
    nice -n 10 .venv/bin/python benchmarks/classifier_transfer.py         # about 5 minutes
    nice .venv/bin/python -m benchmarks.clustering_scale                  # about 2 minutes
    nice .venv/bin/python -m benchmarks.cost_growth                       # about 25 minutes
    .venv/bin/python -m benchmarks.compare /tmp/results_before benchmarks/results
"""

import argparse
import glob
import json
import math
import os
import re
import sys

CONTEXT_ROOTS = ("settings", "calibration", "calibration_before", "calibration_after",
                 "threadpools")
THROUGHPUT = re.compile(r"(^|[._])per_(cpu_)?s([._]|$)|throughput|speedup")
COST_WORDS = {"s", "seconds", "ms", "mib", "gib", "rss", "memory"}
HIGHER_SCORES = ("accuracy", "iou", "silhouette", "ari", "nmi", "f1", "precision", "recall",
                 "detection_rate", "hit_rate")
LOWER_SCORES = ("loss", "false_alarm_rate")
HIGHER, LOWER = "higher", "lower"


def flatten(value, max_list: int = 30, prefix: str = "") -> tuple[dict, list]:
    """({dotted key: number} for every int or float leaf (not bools), [keys of the lists
    left out for being longer than max_list])."""
    numbers, left_out = {}, []

    def walk(node, key):
        if isinstance(node, bool) or node is None or isinstance(node, str):
            return
        if isinstance(node, (int, float)):
            numbers[key] = float(node)
        elif isinstance(node, dict):
            for name, child in node.items():
                walk(child, f"{key}.{name}" if key else str(name))
        elif isinstance(node, list):
            if len(node) > max_list:
                if not all(isinstance(item, str) for item in node):  # names hold no numbers
                    left_out.append(key)
                return
            for index, child in enumerate(node):
                walk(child, f"{key}.{index}" if key else str(index))

    walk(value, prefix)
    return numbers, left_out


def is_context(key: str) -> bool:
    return key.split(".")[0] in CONTEXT_ROOTS or "loadavg" in key


def direction(key: str):
    """HIGHER, LOWER or None (just shown), and whether the number is a timing, a memory or a
    throughput (judged with the time tolerance and only between comparable machines)."""
    named = [part for part in key.lower().split(".") if not part.isdigit()]
    last = named[-1] if named else ""
    if THROUGHPUT.search(last):
        return HIGHER, True
    if set(re.split(r"[._]", key.lower())) & COST_WORDS:
        return LOWER, True
    if last.endswith(HIGHER_SCORES):
        return HIGHER, False
    if last.endswith(LOWER_SCORES):
        return LOWER, False
    return None, False


def relative_change(old: float, new: float) -> float:
    if old == new:
        return 0.0
    if old == 0:
        return math.copysign(math.inf, new)
    return (new - old) / abs(old)


def _number(value) -> str:
    if value is None:
        return "–"
    return f"{value:.4g}"


def calibration_of(report: dict):
    """The calibration the run recorded first (before it, or its only one), or None."""
    for key in ("calibration_before", "calibration"):
        if isinstance(report.get(key), dict):
            return report[key]
    return None


def timing_comparable(old: dict, new: dict, max_ratio: float) -> tuple[bool, str]:
    """Whether timings of the two runs compare, and why not."""
    a, b = calibration_of(old), calibration_of(new)
    if a is None or b is None:
        missing = " and ".join(name for name, c in (("old", a), ("new", b)) if c is None)
        return False, f"no machine calibration in the {missing} run: timings may not compare"
    for field in ("machine", "cpu_count"):
        if a.get(field) != b.get(field):
            return False, (f"different machines ({field} {a.get(field)} vs {b.get(field)}): "
                           f"timings do not compare")
    ta, tb = a.get("fixed_numpy_workload_s"), b.get("fixed_numpy_workload_s")
    if not ta or not tb:
        return False, "no fixed_numpy_workload_s in a calibration: timings may not compare"
    ratio = max(ta, tb) / min(ta, tb)
    load = [_number((c.get("loadavg_1_5_15") or [None])[0]) for c in (a, b)]
    detail = (f"fixed NumPy workload {ta:.3f} s vs {tb:.3f} s (ratio {ratio:.2f}), "
              f"load average {load[0]} vs {load[1]}")
    if ratio > max_ratio:
        return False, f"machines of very different speed: {detail}; timings do not compare"
    return True, detail


def compare(old: dict, new: dict, tolerance: float, time_tolerance: float,
            calibration_ratio: float, max_list: int = 30) -> dict:
    """Rows (key, old, new, change, better, flag) over the union of keys, and the verdicts."""
    old_numbers, old_left_out = flatten(old, max_list)
    new_numbers, new_left_out = flatten(new, max_list)
    comparable, calibration_note = timing_comparable(old, new, calibration_ratio)
    rows, regressions = [], []
    for key in list(old_numbers) + [k for k in new_numbers if k not in old_numbers]:
        a, b = old_numbers.get(key), new_numbers.get(key)
        better, timing = (None, False) if is_context(key) else direction(key)
        row = {"key": key, "old": a, "new": b, "better": better, "flag": ""}
        if a is None or b is None:
            row["flag"] = "only in new" if a is None else "only in old"
        elif not (math.isfinite(a) and math.isfinite(b)):
            row["flag"] = "not finite"
        else:
            row["change"] = relative_change(a, b)
            worse = -row["change"] if better == HIGHER else row["change"]
            limit = time_tolerance if timing else tolerance
            if better is not None and worse > limit:
                if timing and not comparable:
                    row["flag"] = "slower, machines differ"
                else:
                    row["flag"] = "REGRESSION"
                    regressions.append(key)
        rows.append(row)
    return {"rows": rows, "regressions": regressions, "timings_comparable": comparable,
            "calibration": calibration_note,
            "left_out_lists": sorted(set(old_left_out) | set(new_left_out))}


def _change(row) -> str:
    if "change" not in row:
        return "–"
    change = row["change"]
    return "±inf" if math.isinf(change) else f"{100 * change:+.1f} %"


def table(result: dict, changed_only: bool = False, match=None) -> str:
    lines = ["| metric | old | new | change | better | flag |", "| --- | ---: | ---: | ---: | --- | --- |"]
    for row in result["rows"]:
        if match and not re.search(match, row["key"]):
            continue
        if changed_only and row.get("change", 1) == 0 and not row["flag"]:
            continue
        lines.append(f"| {row['key']} | {_number(row['old'])} | {_number(row['new'])} | "
                     f"{_change(row)} | {row['better'] or ''} | {row['flag']} |")
    return "\n".join(lines)


def file_pairs(old: str, new: str) -> tuple[list, list]:
    """[(name, old path, new path)] to compare, and the names found in one folder only."""
    if os.path.isfile(old) and os.path.isfile(new):
        return [(os.path.basename(new), old, new)], []
    if os.path.isdir(old) and os.path.isdir(new):
        names = {os.path.basename(p) for p in glob.glob(os.path.join(old, "*.json"))}
        others = {os.path.basename(p) for p in glob.glob(os.path.join(new, "*.json"))}
        return ([(n, os.path.join(old, n), os.path.join(new, n)) for n in sorted(names & others)],
                sorted(names ^ others))
    raise ValueError(f"give two JSON files or two folders, got {old!r} and {new!r}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old", help="the earlier result file, or folder of result files")
    parser.add_argument("new", help="the later one")
    parser.add_argument("--tolerance", type=float, default=0.05,
                        help="relative worsening of a score flagged as a regression")
    parser.add_argument("--time-tolerance", type=float, default=0.25,
                        help="relative worsening of a timing, memory or throughput flagged")
    parser.add_argument("--calibration-ratio", type=float, default=1.25,
                        help="fixed-workload times further apart than this: timings do not compare")
    parser.add_argument("--max-list", type=int, default=30,
                        help="leave out lists longer than this (per-image records)")
    parser.add_argument("--changed-only", action="store_true", help="hide unchanged numbers")
    parser.add_argument("--match", default=None, metavar="REGEX", help="only keys matching REGEX")
    args = parser.parse_args(argv)
    try:
        pairs, unpaired = file_pairs(args.old, args.new)
    except ValueError as error:
        parser.error(str(error))
    if not pairs:
        parser.error(f"no result file is in both {args.old} and {args.new}")

    regressions = 0
    for name, old_path, new_path in pairs:
        with open(old_path) as handle:
            old = json.load(handle)
        with open(new_path) as handle:
            new = json.load(handle)
        result = compare(old, new, args.tolerance, args.time_tolerance, args.calibration_ratio,
                         args.max_list)
        print(f"## {name}\n")
        print(("timings compare: " if result["timings_comparable"] else "WARNING: ")
              + result["calibration"] + "\n")
        print(table(result, args.changed_only, args.match))
        if result["left_out_lists"]:
            print(f"\nleft out (more than {args.max_list} entries): "
                  + ", ".join(result["left_out_lists"]))
        print(f"\n{len(result['regressions'])} regression(s) in {name}"
              + (": " + ", ".join(result["regressions"]) if result["regressions"] else "") + "\n")
        regressions += len(result["regressions"])
    if unpaired:
        print("in one folder only: " + ", ".join(unpaired))
    print(f"{regressions} regression(s) in all")
    return 1 if regressions else 0


if __name__ == "__main__":
    sys.exit(main())
