"""The test-time views benchmark scores one exported U-Net with several view counts."""

import dataclasses
import json
import os

import numpy as np
import pytest

from components.defects import DEFECT_CLASSES
from tests import benchmark_script

C = len(DEFECT_CLASSES)
SIZE = 32


@pytest.fixture(scope="module")
def bench():
    yield from benchmark_script.load("segmentation_views")


def micrograph(material, seed):
    """Truth: a vacancy square; the teacher's marks: its left half (teacher IoU 0.5)."""
    from components import contract

    rng = np.random.default_rng(seed)
    truth = np.zeros((C, SIZE, SIZE), np.uint8)
    truth[0, 8:16, 8:16] = 1
    pseudo = np.zeros_like(truth)
    pseudo[0, 8:16, 8:12] = 1
    deviation = rng.normal(size=(SIZE, SIZE)).astype(np.float32)
    return contract.Micrograph(
        image=rng.normal(size=(SIZE, SIZE)).astype(np.float32), material=material,
        label="vacancy", pixel_size_pm=20.0, source=f"{material}-{seed}", mask_true=truth,
        mask_pseudo=pseudo, deviation=deviation, deviation_z=deviation, noise_sigma=1.0,
        pseudo_label_status="ok")


def test_every_view_count_is_scored_against_the_truth_and_the_teacher(bench, tmp_path, capsys):
    import tensorflow as tf

    from components import contract
    from modules import segmenter

    # prior 0.5: the untrained network's answers scatter around the threshold, so they
    # mark pixels, and differently for different views
    config = segmenter.SegmenterConfig(tile_size=32, base_filters=4, depth=2, prior_probability=0.5)
    model = segmenter.build_unet(C, config)
    model_dir = str(tmp_path / "model")
    model.save(model_dir, save_format="tf", signatures=segmenter._signatures(model, config))
    history = tmp_path / "history.json"
    history.write_text(json.dumps({"config": [dataclasses.asdict(config)]}))
    micrographs = [micrograph("SrTiO3", 1), micrograph("CdTe", 2), micrograph("CdTe", 3)]
    examples = tmp_path / "examples" / "test.gz"
    os.makedirs(examples.parent)
    with tf.io.TFRecordWriter(str(examples), options="GZIP") as writer:
        for one in micrographs:
            writer.write(contract.to_example(one).SerializeToString())

    out = tmp_path / "views.json"
    report = bench.main(["--model", model_dir, "--history", str(history), "--examples",
                         str(examples), "--views", "1", "8", "--frame-size", "64", "--out", str(out)])
    assert json.loads(out.read_text())["rows"] == report["rows"]
    assert [row["views"] for row in report["rows"]] == [1, 8]
    assert report["images"] == 3
    assert report["teacher_vs_truth"]["overall"]["vacancy"] == pytest.approx(0.5)
    assert report["teacher_vs_truth"]["CdTe"]["vacancy"] == pytest.approx(0.5)
    assert report["teacher_vs_truth"]["overall"]["substitution"] is None  # nothing true, nothing marked

    # the single view's IoU, computed here from the network itself
    def single_view(one):
        x = segmenter.network_input(one.image[None], one.deviation_z[None], config.inputs)
        return model(x, training=False).numpy()[0, ..., 0] > 0.5

    predicted = np.stack([single_view(one) for one in micrographs])
    truth = np.stack([one.mask_true[0] for one in micrographs]).astype(bool)
    expected = (predicted & truth).sum() / (predicted | truth).sum()
    single, eight = report["rows"]
    assert single["student_vs_truth"]["vacancy"] == pytest.approx(expected)
    cdte = predicted[1:] & truth[1:]
    assert single["student_vs_truth_per_material"]["CdTe"]["vacancy"] == pytest.approx(
        cdte.sum() / (predicted[1:] | truth[1:]).sum())
    assert eight["student_vs_truth"]["vacancy"] != pytest.approx(expected)
    assert all(row["frame"]["height"] == 64 and row["frame"]["seconds"] > 0 for row in report["rows"])
    table = capsys.readouterr().out
    assert "| vacancy vs truth |" in table and "| 64 x 64 frame" in table

    with pytest.raises(SystemExit):
        bench.main(["--model", model_dir, "--history", str(history), "--examples",
                    str(examples), "--views", "2", "--frame-size", "0", "--out", str(tmp_path / "bad.json")])
    assert not (tmp_path / "bad.json").exists()


def test_a_run_from_before_the_opening_is_served_without_it_unless_asked(bench, tmp_path):
    import tensorflow as tf

    from components import contract
    from modules import segmenter

    config = segmenter.SegmenterConfig(tile_size=32, base_filters=4, depth=2, prior_probability=0.5)
    model = segmenter.build_unet(C, config)
    model_dir = str(tmp_path / "model")
    model.save(model_dir, save_format="tf", signatures=segmenter._signatures(model, config))
    recorded = dataclasses.asdict(config)
    del recorded["planar_min_width"]  # as an older Trainer's history.json
    history = tmp_path / "history.json"
    history.write_text(json.dumps({"config": [recorded]}))
    examples = tmp_path / "test.gz"
    with tf.io.TFRecordWriter(str(examples), options="GZIP") as writer:
        writer.write(contract.to_example(micrograph("CdTe", 4)).SerializeToString())

    def run(*extra):
        return bench.main(["--model", model_dir, "--history", str(history), "--examples",
                           str(examples), "--views", "1", "--frame-size", "0",
                           "--out", str(tmp_path / "views.json"), *extra])

    as_recorded, opened = run(), run("--planar-min-width", "9")
    assert as_recorded["segmenter"]["planar_min_width"] == 0
    assert opened["segmenter"]["planar_min_width"] == 9
    # the opening touches the planar classes only
    assert opened["rows"][0]["student_vs_truth"]["vacancy"] == \
        as_recorded["rows"][0]["student_vs_truth"]["vacancy"]
