"""PseudoLabeler: every example comes out once, untouched but for the pseudo-label features,
which come from the image alone; the report scores them where ground truth exists."""

import dataclasses
import glob
import json
import os

import numpy as np
import pytest
import tensorflow as tf

from components import contract
from components.defects import DEFECT_CLASSES, class_index
from components.pseudo_labels.component import PseudoLabeler, PseudoLabelReport
from components.pseudo_labels.executor import (
    REPORT_FILE,
    Executor,
    label_example,
    parse_pseudo_label_config,
)
from components.pseudo_labels.lattice import PseudoLabelConfig
from components.synthesis.simulator import SimulationConfig, seed_for, simulate_image

SIZE = 96
# High dose, fixed thickness and pixel size: every drawn defect stands far above the noise.
STRONG = SimulationConfig(size=SIZE, dose=(2e4, 2e4), thickness_nm=(15.0, 15.0),
                          pixel_size_pm=(20.0, 20.0))
NO_LATTICE = "no lattice"
FLAT_SOURCE = "test:flat"  # the NO_LATTICE image
SPLITS = {
    "train": [("SrTiO3", "vacancy"), ("CdTe", "vacancy"), ("SrTiO3", "bulk"),
              ("CdTe", "substitution"), ("SrTiO3", "interstitial")],
    "eval": [("CdTe", "bulk"), ("SrTiO3", "substitution"), ("SrTiO3", NO_LATTICE)],
}
BEAM_ARGS = ["--direct_running_mode=in_memory", "--direct_num_workers=1"]


def micrograph(material, label, index):
    """A strong simulated image, or for NO_LATTICE a flat one with shot noise only."""
    if label == NO_LATTICE:
        image = np.random.default_rng(index).poisson(50.0, (SIZE, SIZE)).astype(np.float32)
        return contract.Micrograph(
            image=image, material=material, label="bulk", pixel_size_pm=20.0,
            source=FLAT_SOURCE, defect_classes=np.zeros(len(DEFECT_CLASSES), np.int64),
            mask_true=np.zeros((len(DEFECT_CLASSES), SIZE, SIZE), np.uint8), dose=1e3)
    simulated = simulate_image(material, label, seed_for(11, index), STRONG)
    return contract.Micrograph(
        image=simulated.image, material=material, label=label,
        pixel_size_pm=simulated.pixel_size_pm, source=f"test:index={index}",
        defect_classes=simulated.defect_classes, mask_true=simulated.mask, dose=simulated.dose)


def write_examples(uri, splits):
    """An Examples artifact at `uri` holding {split: [Micrograph]} as gzipped TFRecords."""
    from tfx.types import artifact_utils, standard_artifacts

    for split, micrographs in splits.items():
        os.makedirs(os.path.join(uri, f"Split-{split}"))
        path = os.path.join(uri, f"Split-{split}", "data_tfrecord-00000-of-00001.gz")
        with tf.io.TFRecordWriter(path, "GZIP") as writer:
            for one in micrographs:
                writer.write(contract.to_example(one).SerializeToString())
    examples = standard_artifacts.Examples()
    examples.uri = uri
    examples.split_names = artifact_utils.encode_split_names(list(splits))
    return examples


def read_examples(uri):
    """{split: {source: tf.train.Example}} from an Examples artifact's directory."""
    out = {}
    for split_dir in sorted(glob.glob(os.path.join(uri, "Split-*"))):
        files = sorted(glob.glob(os.path.join(split_dir, "*.gz")))
        examples = [tf.train.Example.FromString(r.numpy())
                    for r in tf.data.TFRecordDataset(files, compression_type="GZIP")]
        by_source = {e.features.feature[contract.SOURCE].bytes_list.value[0]: e for e in examples}
        assert len(by_source) == len(examples), "an example came out twice"
        out[os.path.basename(split_dir)[len("Split-"):]] = by_source
    return out


def run_pseudo_labeler(root, splits, beam_args=BEAM_ARGS):
    """Runs the executor on {split: [Micrograph]}; (inputs, outputs, output artifact, report)."""
    from tfx.dsl.components.base.base_beam_executor import BaseBeamExecutor
    from tfx.types import standard_artifacts

    source = write_examples(os.path.join(root, "input"), splits)
    labelled = standard_artifacts.Examples()
    labelled.uri = os.path.join(root, "labelled")
    report = PseudoLabelReport()
    report.uri = os.path.join(root, "report")
    Executor(BaseBeamExecutor.Context(beam_pipeline_args=beam_args)).Do(
        {"examples": [source]},
        {"pseudo_labelled_examples": [labelled], "report": [report]},
        {"pseudo_label_config": json.dumps({"code_fingerprint": "any"})},
    )
    with open(os.path.join(report.uri, REPORT_FILE)) as handle:
        # NaN is not JSON: the report writes null for "nothing to measure"
        quality = json.loads(handle.read(), parse_constant=lambda name: pytest.fail(name))
    return read_examples(source.uri), read_examples(labelled.uri), labelled, quality


def simulated_splits():
    index = iter(range(100))
    return {split: [micrograph(m, label, next(index)) for m, label in pairs]
            for split, pairs in SPLITS.items()}


@pytest.fixture(scope="module")
def labelled_run(tmp_path_factory):
    return run_pseudo_labeler(str(tmp_path_factory.mktemp("run")), simulated_splits())


def labels_of(examples, label):
    return [e for e in examples.values()
            if e.features.feature[contract.LABEL].bytes_list.value[0] == label.encode()]


def test_component_wires_examples_in_and_labelled_examples_and_report_out():
    from tfx import types
    from tfx.types import standard_artifacts

    component = PseudoLabeler(examples=types.Channel(type=standard_artifacts.Examples),
                              pseudo_label_config="{}")
    assert set(component.outputs) == {"pseudo_labelled_examples", "report"}
    assert component.outputs["report"].type is PseudoLabelReport


def test_config_overrides_fields_and_ignores_the_code_fingerprint():
    config = parse_pseudo_label_config(json.dumps({"k_site": 5.0, "code_fingerprint": "abc"}))
    assert config == dataclasses.replace(PseudoLabelConfig(), k_site=5.0)
    with pytest.raises(ValueError, match="k_sight"):
        parse_pseudo_label_config(json.dumps({"k_sight": 5.0}))


def test_every_example_comes_out_once_with_its_features_intact_and_pseudo_labels_added(labelled_run):
    from tfx.types import artifact_utils

    inputs, outputs, labelled, _ = labelled_run
    assert artifact_utils.decode_split_names(labelled.split_names) == list(SPLITS)
    assert labelled.get_string_custom_property("payload_format") == "FORMAT_TF_EXAMPLE"
    assert {split: sorted(examples) for split, examples in outputs.items()} == \
        {split: sorted(examples) for split, examples in inputs.items()}
    for split, examples in inputs.items():
        for source, original in examples.items():
            features = outputs[split][source].features.feature
            assert set(features) == set(original.features.feature) | set(contract.PSEUDO_LABEL_KEYS)
            for key, value in original.features.feature.items():
                assert features[key].SerializeToString() == value.SerializeToString(), key
            decoded = contract.from_example(outputs[split][source])
            assert decoded.deviation.dtype == np.float32
            assert decoded.deviation.shape == decoded.deviation_z.shape == decoded.image.shape
            assert decoded.mask_pseudo.dtype == np.uint8
            assert decoded.mask_pseudo.shape == (len(DEFECT_CLASSES),) + decoded.image.shape
            assert decoded.noise_sigma > 0
            if source != FLAT_SOURCE.encode():
                assert decoded.pseudo_label_status == "ok"


def test_vacancy_images_get_a_vacancy_mask(labelled_run):
    _, outputs, _, _ = labelled_run
    vacancies = labels_of(outputs["train"], "vacancy")
    assert len(vacancies) == 2
    for example in vacancies:
        assert contract.from_example(example).mask_pseudo[class_index("vacancy")].any()


def test_image_without_lattice_is_kept_with_the_reason(labelled_run):
    _, outputs, _, _ = labelled_run
    decoded = contract.from_example(outputs["eval"][FLAT_SOURCE.encode()])
    assert decoded.pseudo_label_status.startswith("no_lattice: ")
    assert not decoded.deviation.any() and not decoded.deviation_z.any() and not decoded.mask_pseudo.any()
    assert decoded.noise_sigma == pytest.approx(np.sqrt(50.0), rel=0.2)  # its shot noise


def test_pseudo_labels_do_not_depend_on_mask_true():
    original = micrograph("SrTiO3", "vacancy", 0)
    garbage = dataclasses.replace(original, mask_true=np.ones_like(original.mask_true))
    config = PseudoLabelConfig()
    honest, fooled = (
        tf.train.Example.FromString(label_example(contract.to_example(m).SerializeToString(),
                                                  config).example).features.feature
        for m in (original, garbage))
    for key in contract.PSEUDO_LABEL_KEYS:
        assert honest[key].SerializeToString() == fooled[key].SerializeToString(), key
    assert contract.from_example(contract.to_example(original)).mask_true is not None


def test_substitutions_take_the_contrast_of_the_examples_material():
    """A CdTe substitution dims its column (Zn, Se are lighter than Cd, Te): the labeller marks
    it as CdTe or as a material the registry does not hold, and not under SrTiO3's sign
    (brighter only)."""
    original = micrograph("CdTe", "substitution", 2)

    def substitution_pixels(material):
        m = dataclasses.replace(original, material=material)
        labelled = label_example(contract.to_example(m).SerializeToString(), PseudoLabelConfig())
        return int(contract.from_example(labelled.example).mask_pseudo[class_index("substitution")].sum())

    assert substitution_pixels("CdTe") > 0
    assert substitution_pixels("unknown") == substitution_pixels("CdTe")
    assert substitution_pixels("SrTiO3") == 0


def test_report_scores_every_class_per_split_and_material_where_ground_truth_exists(labelled_run):
    _, _, _, quality = labelled_run
    overall = quality["overall"]
    assert (overall["examples"], overall["ok"], overall["no_lattice"]) == (8, 7, 1)
    assert overall["ground_truth"] == "present" and overall["examples_with_ground_truth"] == 8
    assert list(overall["per_class"]) == list(DEFECT_CLASSES)
    assert overall["per_class"]["vacancy"]["recall"] > 0
    assert set(overall["by_material"]) == {"SrTiO3", "CdTe"}
    assert list(quality["splits"]) == list(SPLITS)
    for kind in ("tp", "fp", "fn"):
        for name in DEFECT_CLASSES:
            per_split = [quality["splits"][s]["per_class"][name][kind] for s in SPLITS]
            per_material = [m["per_class"][name][kind] for m in overall["by_material"].values()]
            assert sum(per_split) == sum(per_material) == overall["per_class"][name][kind]
    # no stacking faults anywhere, and none labelled: nothing to measure
    assert overall["per_class"]["stacking_fault"]["iou"] is None


def test_two_worker_processes_give_the_same_examples_and_report(labelled_run, tmp_path):
    """The pipeline's default Beam runner (multi-process) against the single-process run."""
    _, outputs, _, quality = labelled_run
    _, parallel, _, parallel_quality = run_pseudo_labeler(
        str(tmp_path), simulated_splits(),
        ["--direct_running_mode=multi_processing", "--direct_num_workers=2"])
    assert {split: sorted(examples) for split, examples in parallel.items()} == \
        {split: sorted(examples) for split, examples in outputs.items()}
    assert parallel_quality == quality


def test_report_says_ground_truth_is_absent_without_mask_true(tmp_path):
    real = [dataclasses.replace(micrograph("CdTe", "bulk", i), mask_true=None, defect_classes=None,
                                dose=None) for i in range(2)]
    _, outputs, _, quality = run_pseudo_labeler(str(tmp_path), {"test": real})
    assert len(outputs["test"]) == 2
    for summary in (quality["overall"], quality["splits"]["test"],
                    quality["overall"]["by_material"]["CdTe"]):
        assert summary["ground_truth"] == "absent" and "per_class" not in summary
        assert summary["examples"] == 2
