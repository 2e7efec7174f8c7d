"""MicrographExampleGen: its configuration, and its executor on a folder of real files."""

import collections
import csv
import dataclasses
import glob
import json
import os

import numpy as np
import pytest

from components import contract
from components.micrographs import reader
from components.micrographs.executor import (
    COMPANION, FAILED, QUARANTINE_CSV, QUARANTINE_JSON, MicrographConfig, folder_fingerprint,
    split_of_file, summary)
from tests.test_micrograph_reader import (
    lattice_image, write_broken_corpus, write_dm, write_emd_velox, write_emi, write_png,
    write_ser, write_tiff_imagej)


# ----------------------------------------------------------------- configuration


@pytest.mark.parametrize("field, value, message", [
    ("root", "/no/such/folder", "does not exist"),
    ("material", "GaAs", "unknown material"),
    ("target_pixel_size_pm", -20.0, "positive"),
    ("fallback_pixel_size_pm", 0.0, "positive"),
    ("fallback_pixel_size_pm", 5000.0, "plausible"),
    ("plausible_pixel_size_pm", (50.0, 10.0), "low < high"),
    ("estimate_tolerance", 1.5, "(0, 1)"),
    ("tile_size", -256, ">= 0"),
    ("tile_size", 32, "min_size"),
    ("overlap", 256, "smaller than tile_size"),
    ("min_size", 8, "at least 16"),
    ("max_frame_pixels", 100, "tile_size squared"),
    ("label_source", "name", "folder, pattern"),
    ("label_pattern", "(unclosed", "not a regular expression"),
    ("label_pattern", r"\d+", "group"),
    ("split_tenths", (8, 2, 0), "three positive"),
    ("estimate_pixel_size", "yes", "true or false"),
])
def test_bad_configuration_is_refused_naming_the_field(tmp_path, field, value, message):
    fields = dict(root=str(tmp_path), material="SrTiO3")
    fields[field] = value
    with pytest.raises(ValueError, match=rf"MicrographConfig\.{field}: .*") as caught:
        MicrographConfig(**fields)
    assert message in str(caught.value)


def test_the_component_refuses_bad_json_at_construction_and_round_trips_good_json(tmp_path):
    from components.micrographs.component import MicrographExampleGen, QuarantineReport

    config = MicrographConfig(root=str(tmp_path), material="CdTe", label_source="pattern")
    text = config.to_json(folder_fingerprint=folder_fingerprint(str(tmp_path)))
    assert MicrographConfig.from_json(text) == config
    component = MicrographExampleGen(micrograph_config=text)
    assert component.outputs["quarantine"].type is QuarantineReport
    assert QuarantineReport.TYPE_NAME == "stem_defects.QuarantineReport"
    with pytest.raises(ValueError, match="unknown fields .*'tile'"):
        MicrographExampleGen(micrograph_config=json.dumps(dict(json.loads(text), tile=128)))
    with pytest.raises(ValueError, match="MicrographConfig.material"):
        MicrographExampleGen(micrograph_config=json.dumps(dict(json.loads(text), material="Si")))


def test_split_follows_the_file_path_deterministically_and_the_ratio():
    paths = [f"session_{i // 10}/image_{i}.dm4" for i in range(2000)]
    splits = [split_of_file(path, (7, 2, 1)) for path in paths]
    assert splits == [split_of_file(path, (7, 2, 1)) for path in paths]
    counts = collections.Counter(splits)
    assert counts["train"] / 2000 == pytest.approx(0.7, abs=0.04)
    assert counts["eval"] / 2000 == pytest.approx(0.2, abs=0.04)
    assert counts["test"] / 2000 == pytest.approx(0.1, abs=0.03)


# ------------------------------------------------------------------------ a run


def read_splits(uri):
    import tensorflow as tf

    splits = {}
    for split_dir in sorted(glob.glob(os.path.join(uri, "Split-*"))):
        files = sorted(glob.glob(os.path.join(split_dir, "*.gz")))
        records = tf.data.TFRecordDataset(files, compression_type="GZIP")
        splits[os.path.basename(split_dir)[len("Split-"):]] = [
            contract.from_example(record.numpy()) for record in records]
    return splits


def write_folder(root):
    """A microscopist's folder: good files in every format, labelled by folder, and the broken
    corpus. Returns {relative path: expected reason} of the files to be set aside."""
    (root / "Vacancy").mkdir(parents=True)
    (root / "bulk").mkdir()
    (root / "broken").mkdir()
    # 300 x 300 at 20 pm: tiled into 2 x 2 tiles of 256 with at least 64 overlap
    write_dm(root / "Vacancy" / "big.dm3", lattice_image(size=300, label="vacancy"), 20.0)
    # 96 x 96 at 40 pm: resampled to 192 x 192, one whole tile
    write_tiff_imagej(root / "Vacancy" / "coarse.tif", lattice_image(pixel_size_pm=40.0, size=96),
                      40.0)
    write_emd_velox(root / "bulk" / "velox.emd", lattice_image(size=128, seed=1), 20.0)
    write_ser(root / "bulk" / "tia_1.ser", lattice_image(pixel_size_pm=25.0, size=96, seed=2), 25.0)
    write_emi(root / "bulk" / "tia.emi")  # the .ser's metadata: a companion, no examples
    # no pixel size in a PNG: estimated from the lattice (25 pm, resampled to 160 x 160)
    write_png(root / "bulk" / "export.png", lattice_image(pixel_size_pm=25.0, size=128, seed=3),
              "RGB")
    broken = write_broken_corpus(root / "broken")
    expected = {f"broken/{name}": reason for name, reason in broken.items()}
    # absurd metadata: a 1 m pixel
    write_tiff_imagej(root / "broken" / "absurd.tif", lattice_image(size=64), 1e12, unit="m")
    expected["broken/absurd.tif"] = reader.ABSURD_PIXEL_SIZE
    # noise without a lattice, and no pixel size: nothing to resample by
    write_png(root / "broken" / "noise.png", np.random.default_rng(0).normal(size=(96, 96)))
    expected["broken/noise.png"] = reader.NO_PIXEL_SIZE
    # 40 x 40 at 20 pm: under min_size
    write_tiff_imagej(root / "broken" / "tiny.tif", lattice_image(size=40), 20.0)
    expected["broken/tiny.tif"] = reader.TOO_SMALL
    (root / ".hidden").mkdir()
    (root / ".hidden" / "ignored.tif").write_text("hidden folders are not searched")
    return expected


def run_executor(tmp_path, config):
    from tfx.dsl.components.base.base_beam_executor import BaseBeamExecutor
    from tfx.types import standard_artifacts

    from components.micrographs.component import QuarantineReport
    from components.micrographs.executor import Executor

    examples, quarantine = standard_artifacts.Examples(), QuarantineReport()
    examples.uri, quarantine.uri = str(tmp_path / "examples"), str(tmp_path / "quarantine")
    os.makedirs(quarantine.uri)
    context = BaseBeamExecutor.Context(
        beam_pipeline_args=["--direct_running_mode=in_memory", "--direct_num_workers=1"],
        tmp_dir=str(tmp_path / "tmp"), unique_id="test")
    Executor(context).Do({}, {"examples": [examples], "quarantine": [quarantine]},
                         {"micrograph_config": config.to_json()})
    return examples, quarantine


def test_a_folder_becomes_contract_examples_and_every_bad_file_is_quarantined(tmp_path):
    root = tmp_path / "micrographs"
    expected_reasons = write_folder(root)
    config = MicrographConfig(root=str(root), material="SrTiO3", label_source="folder")
    examples, quarantine = run_executor(tmp_path, config)

    report = json.loads((tmp_path / "quarantine" / QUARANTINE_JSON).read_text())
    assert {row["relative_path"]: row["reason"] for row in report["quarantined"]} == expected_reasons
    assert all(row["detail"] for row in report["quarantined"])
    with open(tmp_path / "quarantine" / QUARANTINE_CSV) as handle:
        rows = list(csv.DictReader(handle))
    assert {row["relative_path"]: row["reason"] for row in rows} == expected_reasons
    assert report["files"] == len(expected_reasons) + 5 + 1
    assert report["files_used"] == 5 and report["files_quarantined"] == len(expected_reasons)
    assert sum(report["quarantined_by_reason"].values()) == len(expected_reasons)
    assert report["pixel_size_sources"] == {"estimated": 1, "metadata": 4}
    assert quarantine.get_int_custom_property("files_quarantined") == len(expected_reasons)
    assert report["files_companion"] == quarantine.get_int_custom_property("files_companion") == 1
    assert report["companions"] == [dict(relative_path="bulk/tia.emi", ser_files=["bulk/tia_1.ser"],
                                         path=str(root / "bulk" / "tia.emi"))]
    assert ", 1 TIA .emi beside their .ser, " in summary(report)
    from pipeline.reports import quarantine_summary

    assert quarantine_summary(quarantine.uri)[0] == (
        f"5 of {report['files']} files used, 1 TIA .emi read through their .ser, "
        f"{len(expected_reasons)} set aside")
    (estimate,) = report["estimated_pixel_sizes"]
    assert estimate["relative_path"] == "bulk/export.png" and estimate["used"]
    assert estimate["estimated_pixel_size_pm"] == pytest.approx(25.0, rel=0.03)

    splits = read_splits(examples.uri)
    assert set(splits) == {"train", "eval", "test"}
    assert report["examples_by_split"] == {split: len(splits[split]) for split in splits}
    by_file = collections.defaultdict(list)
    for split, micrographs in splits.items():
        for micrograph in micrographs:
            by_file[os.path.relpath(micrograph.source, root)].append((split, micrograph))
    assert {name: len(tiles) for name, tiles in by_file.items()} == {
        "Vacancy/big.dm3": 4, "Vacancy/coarse.tif": 1, "bulk/velox.emd": 1,
        "bulk/tia_1.ser": 1, "bulk/export.png": 1}
    for name, tiles in by_file.items():
        assert len({split for split, _ in tiles}) == 1, f"{name}: tiles in several splits"
        assert tiles[0][0] == split_of_file(name, (7, 2, 1))
        for _, micrograph in tiles:
            assert micrograph.material == "SrTiO3"
            assert micrograph.label == ("vacancy" if name.startswith("Vacancy") else "bulk")
            assert micrograph.pixel_size_pm == pytest.approx(20.0, rel=0.01)
            assert micrograph.mask_true is None and micrograph.dose is None
            assert micrograph.defect_classes is None
            assert micrograph.tile_origin is not None
    origins = sorted(m.tile_origin for _, m in by_file["Vacancy/big.dm3"])
    assert origins == [(0, 0), (0, 44), (44, 0), (44, 44)]
    assert all(m.image.shape == (256, 256) for _, m in by_file["Vacancy/big.dm3"])
    (_, coarse), = by_file["Vacancy/coarse.tif"]
    assert coarse.image.shape == (192, 192) and coarse.source_pixel_size_pm == pytest.approx(40.0)
    assert coarse.pixel_size_source == "metadata"
    (_, png), = by_file["bulk/export.png"]
    assert png.pixel_size_source == "estimated"
    assert png.source_pixel_size_pm == pytest.approx(25.0, rel=0.03)


def test_an_emi_is_the_companion_of_its_ser_files_or_quarantined_without_them(tmp_path):
    from components.micrographs.executor import process_file

    write_emi(tmp_path / "scan.emi")
    config = MicrographConfig(root=str(tmp_path), material="SrTiO3")
    paired = process_file(str(tmp_path / "scan.emi"), "scan.emi", config, ["scan_1.ser"])
    assert paired.examples == [] and paired.record["status"] == COMPANION
    assert paired.record["ser_files"] == ["scan_1.ser"] and "scan_1.ser" in paired.record["detail"]
    lone = process_file(str(tmp_path / "scan.emi"), "scan.emi", config)
    assert lone.examples == [] and lone.record["status"] == "quarantined"
    assert lone.record["reason"] == reader.EMI_WITHOUT_SER
    assert "no scan_1.ser" in lone.record["detail"]


def test_the_pseudo_labeler_takes_real_examples_unchanged(tmp_path):
    """The next component reads a real tile like a synthetic one and keeps its new fields."""
    from components.micrographs.executor import process_file
    from components.pseudo_labels.executor import label_example
    from components.pseudo_labels.lattice import PseudoLabelConfig

    write_dm(tmp_path / "a.dm3", lattice_image(size=128, label="vacancy"), 20.0)
    config = MicrographConfig(root=str(tmp_path), material="SrTiO3")
    result = process_file(str(tmp_path / "a.dm3"), "a.dm3", config)
    ((_, serialized),) = result.examples
    labelled = contract.from_example(label_example(serialized, PseudoLabelConfig()).example)
    assert labelled.pseudo_label_status == "ok"
    assert labelled.tile_origin == (0, 0) and labelled.pixel_size_source == "metadata"
    assert labelled.label == reader.UNKNOWN_LABEL


def test_fallback_pixel_size_is_used_with_a_note_and_unexpected_failures_are_quarantined(
        tmp_path, monkeypatch):
    from components.micrographs import executor

    write_png(tmp_path / "noise.png", np.random.default_rng(0).normal(size=(96, 96)))
    config = MicrographConfig(root=str(tmp_path), material="SrTiO3", fallback_pixel_size_pm=30.0)
    result = executor.process_file(str(tmp_path / "noise.png"), "noise.png", config)
    assert result.record["pixel_size_source"] == "fallback"
    assert any("fallback 30 pm" in note for note in result.record["notes"])
    (_, serialized), = result.examples
    assert contract.from_example(serialized).image.shape == (144, 144)

    def broken_resample(*args):
        raise RuntimeError("boom")

    monkeypatch.setattr(reader, "resample", broken_resample)
    result = executor.process_file(str(tmp_path / "noise.png"), "noise.png", config)
    assert result.examples == [] and result.record["reason"] == FAILED
    assert "RuntimeError: boom" in result.record["detail"]


def test_a_folder_without_any_usable_file_fails_naming_the_report(tmp_path):
    root = tmp_path / "micrographs"
    root.mkdir()
    (root / "notes.txt").write_text("nothing here")
    config = MicrographConfig(root=str(root), material="CdTe")
    with pytest.raises(RuntimeError, match=f"no file under .* gave an example .*{QUARANTINE_JSON}"):
        run_executor(tmp_path, config)
    report = json.loads((tmp_path / "quarantine" / QUARANTINE_JSON).read_text())
    assert report["quarantined_by_reason"] == {reader.UNSUPPORTED: 1}


def test_config_json_has_every_field():
    names = {field.name for field in dataclasses.fields(MicrographConfig)}
    assert set(json.loads(MicrographConfig(root="/", material="CdTe").to_json())) == names
