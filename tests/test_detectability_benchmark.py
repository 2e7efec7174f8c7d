"""The ideal-observer benchmark: its physics (render pairs, per-column SNR), its Monte Carlo
observer and ceiling, and the script end to end on a few tiny images."""

import dataclasses
import json

import numpy as np
import pytest

from components.synthesis.simulator import SimulationConfig, seed_for, simulate_image
from tests import benchmark_script


@pytest.fixture(scope="module")
def bench():
    yield from benchmark_script.load("detectability")


@pytest.mark.parametrize("material,label", [("CdTe", "substitution"), ("CdTe", "interstitial"),
                                            ("SrTiO3", "vacancy")])
def test_render_pair_shares_geometry_and_differs_only_at_the_defects(bench, material, label):
    config = SimulationConfig(size=128)
    seed = seed_for(11, 3)
    defect, bulk = bench.render_pair(material, label, seed, config)
    noisy = simulate_image(material, label, seed, config)
    assert bulk.label == "bulk" and defect.label == label and len(defect.defect_positions)
    for sim in (defect, noisy):
        assert (sim.dose, sim.pixel_size_pm, sim.thickness_nm, sim.rotation_deg) \
            == (bulk.dose, bulk.pixel_size_pm, bulk.thickness_nm, bulk.rotation_deg)
        np.testing.assert_array_equal(sim.scan_shift_px, bulk.scan_shift_px)
    # the defect image holds every bulk column at the same place (an interstitial adds one)
    n = len(bulk.column_positions)
    extra = len(defect.defect_positions) if label == "interstitial" else 0
    assert len(defect.column_positions) == n + extra
    np.testing.assert_array_equal(defect.column_positions[:n], bulk.column_positions)
    # noise-free renders: the noisy image scatters round them
    assert abs(float(np.mean(noisy.image - defect.image))) < 0.05 * float(np.mean(defect.image))
    delta = defect.image.astype(np.float64) - bulk.image
    discs = bench.defect_discs(defect, config, 3.0)
    inside = np.any(discs, axis=0)
    assert np.sum(delta**2) > 0
    assert np.sum(delta[inside] ** 2) > 0.95 * np.sum(delta**2)
    # each disc is centred on its defect's signal where the scan put it (x moved by the
    # line's shift, which varies from line to line): the Delta^2-weighted centroid in the
    # disc sits on the column
    rows, cols = np.indices(delta.shape)
    for (y0, x0), disc in zip(defect.defect_positions, discs):
        w = delta[disc] ** 2
        cy, cx = np.sum(w * rows[disc]) / w.sum(), np.sum(w * cols[disc]) / w.sum()
        expected_x = x0 + np.sum(w * defect.scan_shift_px[rows[disc]]) / w.sum()
        assert abs(cy - y0) < 0.1 and abs(cx - expected_x) < 0.1
        assert abs(rows[disc].mean() - cy) < 0.25 and abs(cols[disc].mean() - cx) < 0.25
    d = bench.column_snr(delta, bulk.image, config.readout_noise, discs)
    assert d.shape == (len(defect.defect_positions),) and np.all(d > 0)


def test_snr_grows_as_the_square_root_of_dose(bench):
    low, high = 4000.0, 16000.0
    seed = seed_for(5, 2)
    snr = {}
    for dose in (low, high):
        config = SimulationConfig(size=128, dose=(dose, dose))
        defect, bulk = bench.render_pair("CdTe", "substitution", seed, config)
        assert defect.dose == pytest.approx(dose)
        delta = defect.image.astype(np.float64) - bulk.image
        discs = bench.defect_discs(defect, config, 3.0)
        snr[dose] = (bench.column_snr(delta, bulk.image, config.readout_noise, discs),
                     [(delta[m], bulk.image[m].astype(np.float64)) for m in discs])
    ratio = snr[high][0] / snr[low][0]
    np.testing.assert_allclose(ratio, 2.0, rtol=0.05)  # readout noise: a little above 2
    assert np.all(ratio >= 2.0 - 1e-6)
    # rescaling the low-dose render to 4x its dose reproduces the high-dose render exactly
    rescaled = bench.snr_at_scale(snr[low][1], 0.5, [1.0, high / low])
    np.testing.assert_allclose(rescaled[0], snr[low][0], rtol=1e-9)
    np.testing.assert_allclose(rescaled[1], snr[high][0], rtol=1e-4)


def test_maximum_of_nulls_matches_brute_force(bench):
    rng = np.random.default_rng(0)
    fast = bench._max_of_nulls(np.full(4000, 300), 1, rng).ravel()
    slow = rng.standard_normal((4000, 300)).max(axis=1)
    assert abs(fast.mean() - slow.mean()) < 0.03 and abs(fast.std() - slow.std()) < 0.03
    assert 2.7 < np.median(fast) < 3.0  # max of 300 N(0, 1)
    assert np.all(bench._max_of_nulls(np.array([0]), 5, rng) == -np.inf)


def test_scanning_observer_is_perfect_for_strong_defects_and_chance_for_none(bench):
    rng = np.random.default_rng(1)
    sites = [300] * 100
    strong = bench.scanning_observer(sites, sites, [[12.0]] * 100, 200, rng)
    assert strong["balanced_accuracy"] > 0.995 and 3.0 < strong["threshold"] < 12.0
    none = bench.scanning_observer(sites, sites, [[0.0, 0.0]] * 100, 200, rng)
    assert abs(none["balanced_accuracy"] - 0.5) < 0.03
    # in between: one defect at d = 3.5 among 300 sites is seen only part of the time
    mid = bench.scanning_observer(sites, sites, [[3.5]] * 100, 200, rng)
    assert 0.6 < mid["balanced_accuracy"] < 0.9
    assert len(mid["per_image_detection"]) == 100


def test_threshold_ceiling_oracle_and_dose_interpolation(bench):
    t, ba = bench.best_threshold(np.array([0.0, 1.0, 2.0]), np.array([5.0, 6.0]))
    assert ba == 1.0 and 2.0 < t <= 5.0
    assert bench.accuracy_ceiling({"vacancy": 1.0, "substitution": 1.0}, 5) == 1.0
    assert bench.accuracy_ceiling({"substitution": 0.9}, 7) == pytest.approx(1 - 2 * 0.1 / 7)
    assert bench.oracle_balanced_accuracy([[0.0]]) == pytest.approx(0.5)
    assert bench.oracle_balanced_accuracy([[30.0, 1.0]]) == pytest.approx(1.0)
    doses = np.array([100.0, 1000.0, 10000.0])
    assert bench.dose_for_rate(doses, np.array([0.0, 0.4, 0.8]), 0.6) \
        == pytest.approx(np.sqrt(1000.0 * 10000.0))
    assert bench.dose_for_rate(doses, np.array([0.0, 0.4, 0.8]), 0.9) is None


def test_benchmark_writes_the_report_and_reprints_its_tables(bench, tmp_path, capsys):
    out = str(tmp_path / "detectability.json")
    report = bench.main(["--images", "2", "--size", "128", "--draws", "20", "--seed", "7",
                         "--out", out, "--quiet"])
    with open(out) as handle:
        saved = json.load(handle)  # strict JSON: no NaN
    assert saved["settings"]["seed"] == 7 and saved["settings"]["images_per_class"] == 2
    assert len(saved["images"]) == len(report["images"]) == 2 * 4 * 2  # 2 materials x 4 labels
    assert set(saved["by_material"]) == {"SrTiO3", "CdTe"}
    for material, m in saved["by_material"].items():
        assert m["paper_accuracy"] == bench.PAPER_ACCURACY[material]
        assert m["num_labels"] == {"SrTiO3": 5, "CdTe": 7}[material]
        assert 0.0 <= m["accuracy_ceiling"] <= m["accuracy_ceiling_oracle"] + 0.02 <= 1.02
        assert set(m["per_class"]) == {"vacancy", "substitution", "interstitial"}
        for v in m["per_class"].values():
            assert v["images"] == 2 and v["bulk_images"] == 2
            for key in ("ideal_balanced_accuracy", "oracle_balanced_accuracy",
                        "share_below_threshold", "teacher_detection_rate",
                        "teacher_false_alarm_rate"):
                assert 0.0 <= v[key] <= 1.0
            assert v["d_max_median"] > 0 and v["delta_share_in_discs_min"] > 0.95
            assert set(v["dose_for_detection"]) == {"50%", "90%"}
            assert len(v["by_dose"]) == 3 and sum(b["images"] for b in v["by_dose"]) == 2
    for r in saved["images"]:
        if r["label"] != "bulk":
            assert len(r["d"]) == r["defects"] and r["d_max"] == pytest.approx(max(r["d"]),
                                                                                abs=1e-3)
    # --table-only reads the file: a value changed there shows in the table
    saved["by_material"]["CdTe"]["accuracy_ceiling"] = 0.12345
    with open(out, "w") as handle:
        json.dump(saved, handle)
    capsys.readouterr()
    bench.main(["--table-only", out])
    table = capsys.readouterr().out
    assert "| CdTe | 7 | 0.123 |" in table
    assert "| material | class | M | median d_max |" in table
    assert "upper bound" in table


def test_config_replace_keeps_the_geometry_stream(bench):
    """noise=False must not shift the geometry draws (render_pair relies on it)."""
    config = SimulationConfig(size=64, defect_margin_px=8)
    a = simulate_image("SrTiO3", "bulk", seed_for(3, 0), config)
    b = simulate_image("SrTiO3", "bulk", seed_for(3, 0), dataclasses.replace(config, noise=False))
    assert (a.dose, a.pixel_size_pm) == (b.dose, b.pixel_size_pm)
    np.testing.assert_array_equal(a.column_positions, b.column_positions)
