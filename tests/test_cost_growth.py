"""The cost-growth benchmark: its run at tiny sizes writes the JSON and the table, it
extrapolates only per-image stages, and its growth exponents come out right on known numbers."""

import json

import pytest

from tests import benchmark_script


@pytest.fixture(scope="module")
def bench():
    yield from benchmark_script.load("cost_growth")


@pytest.fixture(scope="module")
def tiny_settings(bench):
    return bench.pipeline_settings("demo", image_size=64, input_size=32)


def test_tiny_run_writes_measured_and_extrapolated_rows(bench, tmp_path, capsys):
    out = str(tmp_path / "cost_growth.json")
    # a budget no stage meets: every per-image stage is extrapolated beyond its first size
    bench.main(["--sizes", "16", "8", "--stages", "synthesis", "pseudo_labelling", "clustering",
                "--image-size", "64", "--max-stage-seconds", "0.001", "--out", out])
    with open(out) as handle:
        saved = json.load(handle)  # strict JSON: no NaN
    assert saved["settings"]["sizes"] == [8, 16] and saved["settings"]["image_size"] == 64
    assert saved["settings"]["commit"] is not None
    assert saved["calibration_before"]["fixed_numpy_workload_s"] > 0
    assert saved["calibration_after"]["fixed_numpy_workload_s"] > 0
    rows = {(r["stage"], r["images"]): r for r in saved["measurements"]}
    assert set(rows) == {(s, n) for s in ("synthesis", "pseudo_labelling", "clustering")
                         for n in (8, 16)}
    for row in rows.values():
        assert "error" not in row, row
        assert row["seconds"] > 0 and row["ms_per_image"] == pytest.approx(
            1e3 * row["seconds"] / row["images"])
        assert row["cpu_s"] > 0 and row["cpu_ms_per_image"] == pytest.approx(
            1e3 * row["cpu_s"] / row["images"])
        assert 0 < row["peak_mib_after_setup"] <= row["peak_mib"]
    for stage in ("synthesis", "pseudo_labelling"):
        first, second = rows[(stage, 8)], rows[(stage, 16)]
        assert first["how"] == "measured" and first["child_wall_s"] >= first["seconds"]
        assert first["fixed_numpy_workload_s"] > 0
        assert second["how"] == "extrapolated" and second["extrapolated_from"] == 8
        assert second["seconds"] == pytest.approx(2 * first["seconds"])
        assert second["cpu_s"] == pytest.approx(2 * first["cpu_s"])
        assert second["peak_mib"] == first["peak_mib"]
    # clustering holds all rows in memory: never extrapolated, whatever the budget
    assert rows[("clustering", 16)]["how"] == "measured"
    assert set(rows[("clustering", 16)]["parts"]) == {"kmeans", "silhouette", "tsne"}
    # the fresh process measures its own memory, not the (TensorFlow-holding) parent's
    assert rows[("synthesis", 8)]["peak_mib"] < 300
    growth = {g["stage"]: g for g in saved["growth"]}
    assert growth["synthesis"]["cpu_exponent"] is None  # one measured size only
    assert growth["clustering"]["pairwise"][0]["from"] == 8
    assert "16 extrapolated linearly from 8" in growth["synthesis"]["sentence"]

    capsys.readouterr()
    bench.main(["--table-only", out])
    printed = capsys.readouterr().out
    assert "| stage | images | wall s | CPU s | CPU ms per image | peak MiB | how |" in printed
    assert "| synthesis | 16 |" in printed and "extrapolated from 8 |" in printed
    assert "- clustering grows" in printed


def test_tensorflow_stages_time_their_work_apart_from_setup(bench, tiny_settings):
    """In this process (one TensorFlow import) instead of two fresh ones, to stay quick."""
    for measure in (bench.measure_unet_inference, bench.measure_classifier_epoch):
        result = measure(20, tiny_settings)
        assert result["seconds"] > 0 and result["cpu_s"] > 0, measure.__name__
        assert result["peak_mib_after_setup"] > 0, measure.__name__
    assert result["notes"]["classes"] == len(tiny_settings["classes"]) == 7


def test_exponents_recover_known_powers(bench):
    sizes = [1000, 4000, 16000]
    assert bench.fitted_exponent(sizes, [2e-3 * n for n in sizes]) == pytest.approx(1.0)
    assert bench.fitted_exponent(sizes, [1e-6 * n ** 2 for n in sizes]) == pytest.approx(2.0)
    assert bench.fitted_exponent([1000], [1.0]) is None
    # a quadratic part capped at 5,000 rows: super-linear, then constant
    capped = [min(n, 5000) ** 2 * 1e-6 for n in sizes]
    (_, _, before), (_, _, after) = bench.pairwise_exponents(sizes, capped)
    assert before == pytest.approx(2.0) and after == pytest.approx(0.322, abs=1e-3)
    assert [bench.verdict(b, b) for b in (before, 1.05, after)] == \
        ["faster than linearly", "linearly", "slower than linearly"]
    # CPU and wall time must agree on a shape; where they do not, the machine's load spoke
    assert bench.verdict(0.78, 1.01) == bench.verdict(1.33, 0.93) == "linearly"


def test_growth_sentence_names_the_shape_and_the_fastest_part(bench, tiny_settings):
    def row(n, cpu_s, wall_s, parts):
        return {"stage": "clustering", "images": n, "how": "measured", "cpu_s": cpu_s,
                "seconds": wall_s, "peak_mib": 100.0 + n / 100, "parts": parts}

    rows = [row(1000, 1.0, 1.0, {"kmeans": 0.5, "silhouette": 0.5}),
            row(4000, 16.0, 12.0, {"kmeans": 2.0, "silhouette": 8.0}),
            row(16000, 32.0, 24.0, {"kmeans": 8.0, "silhouette": 8.0})]
    (entry,) = bench.growth(rows, tiny_settings)
    assert entry["cpu_exponent"] == pytest.approx(1.25)
    assert entry["pairwise"][0] == {"from": 1000, "to": 4000, "cpu_exponent": pytest.approx(2.0),
                                    "exponent": pytest.approx(1.792, abs=1e-3)}
    assert entry["sentence"].startswith(
        "clustering grows faster than linearly from 1,000 to 4,000 (CPU 2.00, wall 1.79), "
        "then slower than linearly from 4,000 to 16,000 (CPU 0.50, wall 0.50)")
    assert "peak memory 110 MiB at 1,000 and 260 MiB at 16,000" in entry["sentence"]
    assert "fastest-growing part: silhouette (wall-time exponent 2.00 from 1,000 to 4,000)" \
        in entry["sentence"]
    # wall time stretched at 1,000 by other jobs: no shape claimed without CPU time's word
    rows[0]["seconds"] = 4.0
    (entry,) = bench.growth(rows, tiny_settings)
    assert entry["sentence"].startswith("clustering grows linearly from 1,000 to 4,000 "
                                        "(CPU 2.00, wall 0.79), then slower")
