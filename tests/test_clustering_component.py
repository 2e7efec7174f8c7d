"""DefectClusterer's executor pieces: its config, the Beam step that describes images, the report."""

import json
import os

import apache_beam as beam
import numpy as np
import pytest
import tensorflow as tf

from components import contract
from components.clustering import descriptors
from components.clustering.executor import (ClusteringConfig, DescribeFn, composition,
                                            parse_clustering_config, read_keyed_by_split)
from components.defects import DEFECT_CLASSES
from pipeline.config import load_config


def test_config_reads_overrides_and_refuses_unknown_or_bad_fields():
    config = parse_clustering_config(json.dumps({"k_max": 5, "splits": ["test"], "code_fingerprint": "x"}))
    assert config.k_max == 5 and config.splits == ("test",)
    with pytest.raises(ValueError, match=r"unknown clustering options \['kmax'\]"):
        parse_clustering_config(json.dumps({"kmax": 5}))
    with pytest.raises(ValueError, match="k_min <= k_max"):
        ClusteringConfig(k_min=4, k_max=3)
    with pytest.raises(ValueError, match="threshold"):
        ClusteringConfig(threshold=1.0)
    assert parse_clustering_config(json.dumps({"outlier_clip": None})).outlier_clip is None
    with pytest.raises(ValueError, match="outlier_clip must be a positive number"):
        ClusteringConfig(outlier_clip=-1.0)
    with pytest.raises(ValueError, match="unknown clustering options"):
        load_config("test").replace(clustering={"colour": "red"})


class _FakeSegmenter:
    """Stands in for the SavedModel's serving_images of a segmenter that reads the deviation
    map beside the image: class c's map is the image times c/C."""

    structured_input_signature = ((), {"images": None, "deviation_z": None})

    def __init__(self):
        self.batch_shapes = []
        self.deviation_shapes = []

    def __call__(self, images, deviation_z):
        self.batch_shapes.append(tuple(images.shape))
        self.deviation_shapes.append(tuple(deviation_z.shape))
        scale = np.arange(1, len(DEFECT_CLASSES) + 1, dtype=np.float32) / len(DEFECT_CLASSES)
        return {"probabilities": tf.constant(np.asarray(images)[..., None] * scale)}


def _serialized(source, shape, status="ok"):
    rng = np.random.default_rng(len(source))
    micrograph = contract.Micrograph(
        image=rng.uniform(0, 1, shape).astype(np.float32), material="SrTiO3", label="vacancy",
        pixel_size_pm=20.0, source=source, pseudo_label_status=status,
        deviation_z=rng.normal(0, 1, shape).astype(np.float32))
    return contract.to_example(micrograph).SerializeToString(), micrograph


def test_describe_step_batches_images_by_shape_and_keeps_each_source():
    fake = _FakeSegmenter()
    describe = DescribeFn(model_dir="unused", threshold=0.5)
    describe._predict = fake  # what setup() would load
    batch = [("train", _serialized("a", (32, 32))[0]), ("test", _serialized("b", (48, 40))[0]),
             ("train", _serialized("c", (32, 32), status="no_lattice: no Bragg peaks")[0])]
    rows = list(describe.process(batch))
    assert sorted(fake.batch_shapes) == sorted(fake.deviation_shapes) == [(1, 48, 40), (2, 32, 32)]
    assert {(row["split"], row["source"]) for row in rows} == {("train", "a"), ("test", "b"), ("train", "c")}
    _, micrograph = _serialized("b", (48, 40))
    answer = fake(micrograph.image[None], micrograph.deviation_z[None])["probabilities"]
    maps = np.moveaxis(answer.numpy()[0], -1, 0)
    expected = descriptors.describe(maps, micrograph.deviation_z, DEFECT_CLASSES, threshold=0.5,
                                    pixel_size_pm=20.0)
    row = next(row for row in rows if row["source"] == "b")
    np.testing.assert_allclose(row["descriptor"], expected, rtol=1e-6)
    names = descriptors.descriptor_names(DEFECT_CLASSES)
    assert len(row["descriptor"]) == len(names)
    # without a lattice the (all-zero) deviation map is not described as a real one
    available = names.index("deviation_available")
    without_lattice = next(row for row in rows if row["source"] == "c")
    assert row["descriptor"][available] == 1.0 and without_lattice["descriptor"][available] == 0.0


def test_composition_counts_labels_and_materials_per_cluster():
    rows = [dict(label="bulk", material="CdTe"), dict(label="twin_boundary", material="CdTe"),
            dict(label="bulk", material="SrTiO3")]
    summary = composition(rows, np.array([1, 0, 1]))
    assert summary == {
        "0": {"size": 1, "labels": {"twin_boundary": 1}, "materials": {"CdTe": 1}},
        "1": {"size": 2, "labels": {"bulk": 2}, "materials": {"CdTe": 1, "SrTiO3": 1}},
    }


def test_every_record_of_every_split_is_read_once_with_its_split(tmp_path):
    """Under the multi-process DirectRunner, as the pipeline runs it (two workers)."""
    from apache_beam.options.pipeline_options import PipelineOptions

    sizes = {"train": 70, "eval": 20, "test": 10}
    files = {}
    for split, count in sizes.items():
        folder = tmp_path / f"Split-{split}"
        folder.mkdir()
        for shard in range(2):
            with tf.io.TFRecordWriter(str(folder / f"data-{shard}.gz"), options="GZIP") as writer:
                for index in range(shard, count, 2):
                    writer.write(f"{split}:{index}".encode())
        files[split] = os.path.join(str(folder), "*.gz")
    out = tmp_path / "keyed"
    options = PipelineOptions(["--direct_num_workers=2", "--direct_running_mode=multi_processing"])
    with beam.Pipeline(options=options) as pipeline:
        _ = (read_keyed_by_split(pipeline, files)
             | beam.MapTuple(lambda split, record: f"{split} {record.decode()}")
             | beam.io.WriteToText(str(out)))
    lines = sorted(line.strip() for path in tmp_path.glob("keyed*") for line in open(path))
    assert lines == sorted(f"{split} {split}:{index}" for split, count in sizes.items()
                           for index in range(count))
