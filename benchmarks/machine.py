"""What every benchmark records beside its numbers, so two result files can be compared:
how loaded and how fast the machine was, and which commit (with which uncommitted files)
was measured; and how the results are binned by dose, written and printed."""

import json
import os
import platform
import subprocess
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))


def calibration() -> dict:
    """Seconds of a fixed NumPy workload (exp and a matrix product), best of five."""
    rng = np.random.default_rng(0)
    a = rng.random(1 << 18, dtype=np.float32)
    m = rng.random((256, 256), dtype=np.float32)
    best = np.inf
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(20):
            np.exp(a)
            m @ m
        best = min(best, time.perf_counter() - start)
    return {"fixed_numpy_workload_s": best, "loadavg_1_5_15": os.getloadavg(),
            "cpu_count": os.cpu_count(), "machine": platform.processor() or platform.machine()}


def peak_rss_mib() -> float:
    """This process's peak resident memory since it started its program (Linux VmHWM).
    Not ru_maxrss: Linux carries that over exec from the forking parent, so a child of a
    parent holding TensorFlow would report the parent's size."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0  # kB
    raise OSError("no VmHWM in /proc/self/status: peak memory needs Linux")


def git_commit() -> dict:
    def git(*args):
        return subprocess.run(["git", *args], cwd=HERE, capture_output=True, text=True,
                              check=True).stdout
    try:  # porcelain lines are "XY path": strip no leading blank of the status
        return {"commit": git("rev-parse", "HEAD").strip(),
                "dirty_files": [line[3:] for line in git("status", "--porcelain").splitlines()]}
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "dirty_files": None}


def write_report(report: dict, path: str) -> None:
    """Indented JSON with one line per record of any list of records (strict JSON: no NaN)."""
    parts = []
    for key, value in report.items():
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            rows = ",\n".join("    " + json.dumps(v, allow_nan=False) for v in value)
            text = "[\n" + rows + "\n  ]"
        else:
            text = json.dumps(value, indent=2, allow_nan=False).replace("\n", "\n  ")
        parts.append(f"  {json.dumps(key)}: {text}")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as handle:
        handle.write("{\n" + ",\n".join(parts) + "\n}\n")


def print_tables(path: str, tables) -> dict:
    """`--table-only`: the report a benchmark wrote to `path`, printed by its `tables`."""
    with open(path) as handle:
        report = json.load(handle)
    print(tables(report))
    return report


def dose_edges(config, bins: int) -> np.ndarray:
    """Edges of `bins` log-spaced dose bins over a SimulationConfig's dose range (e/A^2)."""
    return np.geomspace(config.dose[0], config.dose[1], bins + 1)


def dose_bin(dose: float, edges: np.ndarray) -> int:
    """The bin of `dose` between `edges`; doses beyond the ends go to the end bins."""
    return int(np.clip(np.searchsorted(edges, dose, side="right") - 1, 0, len(edges) - 2))


def fmt(value, digits=2) -> str:
    """A table cell: the number, or a dash where it is undefined."""
    return "–" if value is None else f"{value:.{digits}f}"
