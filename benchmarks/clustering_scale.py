"""Is clustering 100,000 image descriptors practical? Wall time per stage and peak memory.

    nice .venv/bin/python -m benchmarks.clustering_scale [--size 100000] [--seed 0]
        [--k-max 10] [--out PATH] [--figures DIR]

Synthetic descriptor vectors of the real dimension (len(descriptor_names(DEFECT_CLASSES))),
drawn as a mixture of a few clusters of unequal size and spread that differ in a subset of
the columns only (as images differing in one or two defect classes do), a few columns
constant (classes absent from every image), and a fraction of uniform outliers. Then the
project's own functions, with their defaults except k = 2..k_max:

- `grouping.cluster` as configured by default: standardise, k-means per k (exact up to
  `grouping.MINIBATCH_ABOVE` rows, mini-batch beyond), silhouette per k on its default fixed
  sample of 10,000 rows;
- the same with mini-batch k-means (`minibatch_above=0`), for comparison: which of the two
  is worth its time at this size;
- `grouping.embed`: t-SNE of its default sample of 5,000 rows.

Each stage's wall time (per k where it runs per k) comes from the functions' own clocks;
memory is the process's peak resident set (ru_maxrss) after imports and after each top-level
stage: it only grows, so the stage that raises it is the one that needed the memory
(tracemalloc is not used: it doubles the time of t-SNE). BLAS and OpenMP run with
their default threads: the time is what the pipeline would see on this machine. The agreement
of the chosen clusters with the generating components is a sanity check, not the point.
The machine's state is recorded as in the other benchmarks: compare numbers from one machine.
"""

import argparse
import json
import os
import resource
import time

import numpy as np
from threadpoolctl import threadpool_info

from components.clustering import descriptors, figures, grouping
from components.defects import DEFECT_CLASSES

try:  # run as `python -m benchmarks.clustering_scale`
    from benchmarks.machine import calibration, git_commit
except ImportError:  # run as a file: benchmarks/ is on the path
    from machine import calibration, git_commit

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results", "clustering_scale.json")
COMPONENT_WEIGHTS = (0.30, 0.22, 0.18, 0.12, 0.10, 0.05, 0.03)
INFORMATIVE_COLUMNS = 20  # columns whose mean differs between components
CONSTANT_COLUMNS = 10
OUTLIER_FRACTION = 0.02


def synthetic_descriptors(size: int, dimensions: int, seed: int):
    """(X, component) with component -1 for the outliers."""
    rng = np.random.default_rng(seed)
    weights = np.asarray(COMPONENT_WEIGHTS) / np.sum(COMPONENT_WEIGHTS)
    component = rng.choice(len(weights), size=size, p=weights)
    columns = rng.permutation(dimensions)
    informative = columns[:INFORMATIVE_COLUMNS]
    constant = columns[INFORMATIVE_COLUMNS:INFORMATIVE_COLUMNS + CONSTANT_COLUMNS]
    centres = np.zeros((len(weights), dimensions))
    centres[:, informative] = rng.normal(0.0, 2.0, size=(len(weights), INFORMATIVE_COLUMNS))
    spreads = rng.uniform(0.5, 1.5, size=(len(weights), dimensions))  # anisotropic, per component
    X = centres[component] + spreads[component] * rng.standard_normal((size, dimensions))
    outliers = rng.random(size) < OUTLIER_FRACTION
    low, high = X.min(axis=0), X.max(axis=0)
    X[outliers] = rng.uniform(low, high, size=(int(outliers.sum()), dimensions))
    component[outliers] = -1
    X[:, constant] = rng.normal(size=CONSTANT_COLUMNS)  # the same value in every row
    return X, component


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def stage(name: str, function, record: dict):
    """Run `function`, recording its wall time and the process's peak memory so far."""
    start = time.perf_counter()
    value = function()
    record[name] = {"wall_s": time.perf_counter() - start,
                    "process_peak_rss_mib_so_far": peak_rss_mib()}
    print(f"  {name}: {record[name]['wall_s']:.1f} s", flush=True)
    return value


def summary(result: grouping.ClusteringResult, component: np.ndarray,
            inliers: np.ndarray) -> dict:
    """Seconds per stage (and per k), the choice of k, and agreement with the generating
    components (outliers left out)."""
    def per_k(values):
        return dict(zip(map(str, result.k_values), values))

    clustering = result.to_dict()
    return {
        "seconds": {
            "standardise": result.seconds["standardise"],
            "kmeans_per_k": per_k(result.seconds["fit"]),
            "kmeans_all_k": float(np.sum(result.seconds["fit"])),
            "silhouette_per_k": per_k(result.seconds["silhouette"]),
            "silhouette_all_k": float(np.sum(result.seconds["silhouette"])),
            "total": result.seconds["total"],
        },
        "clustering": {key: clustering[key] for key in
                       ("chosen_k", "k_values", "silhouette", "inertia", "cluster_sizes",
                        "method")},
        "agreement_with_components_excluding_outliers":
            grouping.agreement(component[inliers], result.labels[inliers]),
    }


def build_report(size: int, seed: int, k_max: int, figure_dir=None) -> dict:
    names = descriptors.descriptor_names(DEFECT_CLASSES)
    before = calibration()
    started = time.perf_counter()
    stages: dict = {"imports": {"process_peak_rss_mib_so_far": peak_rss_mib()}}
    X, component = stage("generate", lambda: synthetic_descriptors(size, len(names), seed),
                         stages)
    result = stage("cluster", lambda: grouping.cluster(X, k_range=(2, k_max), seed=seed),
                   stages)
    minibatch = stage("cluster_minibatch", lambda: grouping.cluster(
        X, k_range=(2, k_max), seed=seed, minibatch_above=0), stages)
    Z, _, _ = grouping.standardise(X)
    indices, coords = stage("embed", lambda: grouping.embed(Z, seed=seed), stages)
    inliers = component >= 0
    report = {
        "description": "k-means (k by silhouette) and t-SNE of synthetic image descriptors",
        "settings": {"rows": size, "dimensions": len(names), "seed": seed,
                     "k_range": [2, k_max], "components": len(COMPONENT_WEIGHTS),
                     "component_weights": list(COMPONENT_WEIGHTS),
                     "informative_columns": INFORMATIVE_COLUMNS,
                     "constant_columns": CONSTANT_COLUMNS, "outlier_fraction": OUTLIER_FRACTION,
                     **git_commit()},
        "calibration_before": before,
        "threadpools": [{key: pool.get(key) for key in
                         ("user_api", "internal_api", "num_threads", "version")}
                        for pool in threadpool_info()],
        "default": summary(result, component, inliers),
        "minibatch_kmeans": summary(minibatch, component, inliers),
        "tsne_s": stages["embed"]["wall_s"],
        "default_cluster_and_tsne_s": result.seconds["total"] + stages["embed"]["wall_s"],
        "memory": {"process_peak_rss_mib": peak_rss_mib(),
                   "input_matrix_mib": X.nbytes / 2 ** 20, "stages": stages},
        "tsne": {"rows": int(indices.size),
                 "perplexity": grouping.effective_perplexity(indices.size),
                 "coords_finite": bool(np.isfinite(coords).all())},
        "calibration_after": calibration(),
    }
    report["wall_s"] = time.perf_counter() - started
    if figure_dir:
        figures.silhouette_figure(result.k_values, result.silhouette, result.chosen_k,
                                  os.path.join(figure_dir, "silhouette.png"),
                                  inertia=result.inertia)
        figures.tsne_figure(coords, result.labels[indices], os.path.join(figure_dir, "tsne.png"),
                            true_labels=[f"component {c}" if c >= 0 else "outlier"
                                         for c in component[indices]])
    return report


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=100_000, help="descriptor vectors")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--k-max", type=int, default=10)
    parser.add_argument("--out", default=RESULTS)
    parser.add_argument("--figures", default=None, metavar="DIR",
                        help="also draw the silhouette and t-SNE figures into DIR")
    args = parser.parse_args(argv)
    if args.size <= args.k_max or args.k_max < 2:
        parser.error("need 2 <= --k-max < --size")
    print(f"clustering {args.size} descriptors, k = 2..{args.k_max}", flush=True)
    report = build_report(args.size, args.seed, args.k_max, args.figures)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as handle:
        json.dump(report, handle, indent=2, allow_nan=False)
        handle.write("\n")
    for variant in ("default", "minibatch_kmeans"):
        s, c = report[variant]["seconds"], report[variant]["clustering"]
        ari = report[variant]["agreement_with_components_excluding_outliers"]["ari"]
        print(f"{variant}: chosen k {c['chosen_k']} ({c['method']['algorithm']}, ARI {ari:.3f}); "
              f"standardise {s['standardise']:.1f} s, k-means {s['kmeans_all_k']:.1f} s, "
              f"silhouette {s['silhouette_all_k']:.1f} s, total {s['total']:.1f} s")
    print(f"t-SNE {report['tsne_s']:.1f} s; peak RSS "
          f"{report['memory']['process_peak_rss_mib']:.0f} MiB; results in {args.out}")
    return report


if __name__ == "__main__":
    main()
