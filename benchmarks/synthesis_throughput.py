"""Throughput of the HAADF-STEM simulator: per core, and through a plain Apache Beam pipeline.

    nice -n 19 .venv/bin/python benchmarks/synthesis_throughput.py [--images N] [--skip-beam]

(a) simulate_image over a mixed plan (every material, every label it has) in this process;
    BLAS is held to one thread, so images/s of the process is images/s per core.
(b) a Beam pipeline (DirectRunner, multi_processing, 1 and 2 workers) that maps
    executor.simulate_example over the plan and only counts the bytes of the examples. Worker
    start-up (importing TensorFlow) is timed apart with a run of a few images and removed.

The machine's state goes into the JSON (load, a fixed NumPy workload), since the numbers are
only comparable on the same machine under the same load.
"""

import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"  # before NumPy loads BLAS; Beam's workers inherit it

import argparse  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402
from collections import defaultdict  # noqa: E402

import numpy as np  # noqa: E402

from components.materials import MATERIALS  # noqa: E402
from machine import calibration  # noqa: E402  (benchmarks/machine.py)
from components.synthesis.simulator import (  # noqa: E402
    SimulationConfig,
    plan_dataset,
    seed_for,
    simulate_image,
)

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                       "synthesis_throughput.json")
TARGET_PER_CORE = 100.0  # images/s at 256 x 256




def per_core(num_images: int, seed: int, config: SimulationConfig) -> dict:
    plan = plan_dataset(num_images, sorted(MATERIALS), seed)
    for index, material, label, _ in plan[:4]:  # warm caches and lazy imports
        simulate_image(material, label, seed_for(seed + 1, index), config)
    times = defaultdict(list)
    wall, cpu = time.perf_counter(), time.process_time()
    for index, material, label, _ in plan:
        start = time.perf_counter()
        simulate_image(material, label, seed_for(seed, index), config)
        times[material].append(time.perf_counter() - start)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {
        "images": num_images,
        "size": config.size,
        "wall_s": wall,
        "cpu_s": cpu,
        "images_per_s_per_core": num_images / wall,
        "images_per_cpu_s": num_images / cpu,
        "ms_per_image_median": {m: 1e3 * float(np.median(t)) for m, t in times.items()},
        "target_images_per_s_per_core": TARGET_PER_CORE,
    }


def beam_run(plan, seed: int, config: SimulationConfig, workers: int) -> dict:
    """Wall time of the pipeline and the bytes it produced (from a Beam counter)."""
    import apache_beam as beam
    from apache_beam.metrics.metric import MetricsFilter
    from apache_beam.options.pipeline_options import PipelineOptions

    from components.synthesis.executor import simulate_example

    class CountBytes(beam.DoFn):
        """Simulates each planned image into a tf.Example and counts its bytes."""

        def __init__(self):
            self.total = beam.metrics.Metrics.counter("synthesis", "bytes")

        def process(self, item):
            self.total.inc(len(simulate_example(item, seed, config)))

    options = PipelineOptions(
        ["--direct_running_mode=multi_processing", f"--direct_num_workers={workers}"])
    start = time.perf_counter()
    pipeline = beam.Pipeline(options=options)
    _ = pipeline | beam.Create(plan, reshuffle=True) | beam.ParDo(CountBytes())
    result = pipeline.run()
    result.wait_until_finish()
    wall = time.perf_counter() - start
    counters = result.metrics().query(MetricsFilter().with_name("bytes"))["counters"]
    return {"images": len(plan), "wall_s": wall,
            "bytes": int(sum(c.committed or 0 for c in counters))}


def _root_cause(error: Exception) -> str:
    """The first 'SomeError: message' line of a (worker) traceback, else the error itself."""
    lines = [line.strip() for line in str(error).splitlines()]
    causes = [line for line in lines if re.match(r"^[A-Za-z_.]*(Error|Exception): ", line)]
    return causes[0] if causes else f"{type(error).__name__}: {error}"


def beam(num_images: int, seed: int, config: SimulationConfig) -> dict:
    plan = plan_dataset(num_images, sorted(MATERIALS), seed)
    results = {}
    for workers in (1, 2):
        try:
            startup = beam_run(plan[: 2 * workers], seed, config, workers)
            full = beam_run(plan, seed, config, workers)
        except Exception as error:  # noqa: BLE001 - recorded, the other parts still count
            results[f"workers_{workers}"] = {"error": _root_cause(error)}
            continue
        net = (full["images"] - startup["images"]) / (full["wall_s"] - startup["wall_s"])
        results[f"workers_{workers}"] = {
            "run": full,
            "startup_run": startup,
            "images_per_s": full["images"] / full["wall_s"],
            "images_per_s_without_startup": net,
        }
    ok = [results[f"workers_{w}"] for w in (1, 2) if "error" not in results[f"workers_{w}"]]
    if len(ok) == 2:
        results["speedup_2_vs_1_without_startup"] = (
            ok[1]["images_per_s_without_startup"] / ok[0]["images_per_s_without_startup"])
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=300, help="images for the per-core run")
    parser.add_argument("--beam-images", type=int, default=240, help="images per Beam run")
    parser.add_argument("--seed", type=int, default=20261125)
    parser.add_argument("--skip-beam", action="store_true")
    args = parser.parse_args()

    config = SimulationConfig(size=256)
    report = {"calibration_before": calibration(),
              "per_core": per_core(args.images, args.seed, config)}
    if not args.skip_beam:
        report["beam"] = beam(args.beam_images, args.seed, config)
    report["calibration_after"] = calibration()
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS, "w") as handle:
        json.dump(report, handle, indent=2)

    core = report["per_core"]
    print(f"per core: {core['images_per_s_per_core']:.1f} images/s at {config.size}x{config.size}"
          f" (target {TARGET_PER_CORE:.0f}; median ms/image "
          + ", ".join(f"{m} {t:.1f}" for m, t in core["ms_per_image_median"].items()) + ")")
    for workers in (1, 2):
        part = report.get("beam", {}).get(f"workers_{workers}")
        if part is None:
            continue
        if "error" in part:
            print(f"beam, {workers} worker(s): failed: {part['error']}")
        else:
            print(f"beam, {workers} worker(s): {part['images_per_s']:.1f} images/s, "
                  f"{part['images_per_s_without_startup']:.1f} without worker start-up")
    if "speedup_2_vs_1_without_startup" in report.get("beam", {}):
        speedup = report["beam"]["speedup_2_vs_1_without_startup"]
        print(f"beam speed-up 2 vs 1 workers: {speedup:.2f}")
    load = report["calibration_before"]["loadavg_1_5_15"]
    print(f"load average {load[0]:.2f} on {report['calibration_before']['cpu_count']} cores; "
          f"results in {RESULTS}")


if __name__ == "__main__":
    main()
