"""Beam executor of MicrographExampleGen: a folder of microscope files -> contract examples.

Each file is read, checked, given a pixel size (metadata, else estimated from its lattice,
else the configured fallback), resampled to the pipeline's pixel size, cut into overlapping
tiles and written as examples of the data contract. A file that cannot be used is never
dropped silently and never stops the run: it is set aside with its reason in the quarantine
report. The split is drawn from a hash of the file's path relative to the root, so all tiles
of one file share a split (no leakage between train and test) and a file keeps its split
when others are added. A TIA acquisition is `name.emi` (metadata) and `name_<n>.ser` (the
images): the .ser files are read, and the .emi is listed in the report as their companion;
an .emi whose .ser files are missing is quarantined.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import apache_beam as beam
import tensorflow as tf
from absl import logging
from tfx import types
from tfx.dsl.components.base import base_beam_executor
from tfx.proto import example_gen_pb2
from tfx.types import artifact_utils

from components import contract
from components.materials import MATERIALS
from components.micrographs import reader
from components.micrographs.pixel_size import PixelSizeUnknown, estimate_pixel_size
from components.synthesis.executor import SPLITS, split_pattern, write_splits

QUARANTINE_JSON = "quarantine.json"
QUARANTINE_CSV = "quarantine.csv"
QUARANTINE_COLUMNS = ("relative_path", "reason", "detail", "path")
# A failure outside the checks (a bug, or a file no check foresaw): still set aside, not fatal.
FAILED = "failed"
# Status of a TIA .emi beside its .ser files: no examples of its own, listed in the report.
COMPANION = "companion"
# `Vacancy_12.tif` -> `Vacancy`, `stacking_fault_3.dm4` -> `stacking_fault`: the stem up to
# a last `_<number>`.
DEFAULT_LABEL_PATTERN = r"^(?P<label>.+?)_\d+$"
# Keys of the JSON that only make TFX's cache see what the parameters cannot (the code, the
# folder's files); they are not configuration.
CACHE_KEYS = ("code_fingerprint", "folder_fingerprint")


@dataclasses.dataclass(frozen=True)
class MicrographConfig:
    """How to turn one folder tree of micrographs of one material into examples.

    Every field is checked on construction; a bad one raises ValueError naming it.
    """

    root: str  # folder searched recursively (hidden files and folders are skipped)
    material: str  # a key of components.materials.MATERIALS
    target_pixel_size_pm: float = 20.0  # the synthetic data's nominal pixel size
    # Used, with a warning, for files whose metadata has none and whose lattice gives none.
    fallback_pixel_size_pm: Optional[float] = None
    estimate_pixel_size: bool = True  # from the lattice, for files without a pixel size
    # Largest lattice-shape mismatch an estimate may have (pixel_size.estimate_pixel_size).
    estimate_tolerance: float = 0.08
    # Pixel sizes outside this range (metadata, estimate or fallback) are absurd for an
    # atomic-resolution image: a wrong calibration, not a micrograph to resample.
    plausible_pixel_size_pm: Tuple[float, float] = (2.0, 200.0)
    tile_size: int = 256  # larger frames are cut into tiles of this side
    overlap: int = 64  # least overlap of neighbouring tiles, pixels
    min_size: int = 64  # frames smaller than this (either side, after resampling) are refused
    max_frame_pixels: int = 8192 * 8192  # larger frames (after resampling) are refused
    label_source: Optional[str] = None  # "folder", "pattern", or None: every label "unknown"
    label_pattern: str = DEFAULT_LABEL_PATTERN  # searched in the file's stem
    split_tenths: Tuple[int, int, int] = (7, 2, 1)  # train:eval:test, by file

    def __post_init__(self):
        # JSON gives lists; the config stays hashable with tuples.
        for name in ("plausible_pixel_size_pm", "split_tenths"):
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
        self.validate()

    def _refuse(self, name: str, problem: str) -> None:
        raise ValueError(f"MicrographConfig.{name}: {problem} (got {getattr(self, name)!r})")

    def validate(self) -> None:
        if not isinstance(self.root, str) or not self.root:
            self._refuse("root", "must name a folder")
        if not tf.io.gfile.isdir(self.root):
            self._refuse("root", "folder does not exist or is not a folder")
        if self.material not in MATERIALS:
            self._refuse("material", f"unknown material; known: {', '.join(sorted(MATERIALS))}")
        plausible = self.plausible_pixel_size_pm
        if (not isinstance(plausible, tuple) or len(plausible) != 2
                or not all(_is_number(v) for v in plausible) or not 0 < plausible[0] < plausible[1]):
            self._refuse("plausible_pixel_size_pm", "must be (low, high) with 0 < low < high")
        for name in ("target_pixel_size_pm", "fallback_pixel_size_pm"):
            value = getattr(self, name)
            if value is None and name == "fallback_pixel_size_pm":
                continue
            if not _is_number(value) or not value > 0:
                self._refuse(name, "must be a positive number of picometres")
            if not plausible[0] <= value <= plausible[1]:
                self._refuse(name, f"lies outside plausible_pixel_size_pm {plausible}")
        if not isinstance(self.estimate_pixel_size, bool):
            self._refuse("estimate_pixel_size", "must be true or false")
        if not _is_number(self.estimate_tolerance) or not 0 < self.estimate_tolerance < 1:
            self._refuse("estimate_tolerance", "must lie in (0, 1)")
        for name in ("tile_size", "overlap", "min_size", "max_frame_pixels"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 0:
                self._refuse(name, "must be a whole number >= 0")
        if self.min_size < 16:
            self._refuse("min_size", "must be at least 16 pixels (the schema's smallest image)")
        if self.tile_size < self.min_size:
            self._refuse("tile_size", f"must be at least min_size ({self.min_size})")
        if self.overlap >= self.tile_size:
            self._refuse("overlap", f"must be smaller than tile_size ({self.tile_size})")
        if self.max_frame_pixels < self.tile_size ** 2:
            self._refuse("max_frame_pixels", f"must be at least tile_size squared "
                                             f"({self.tile_size ** 2})")
        if self.label_source not in (None,) + reader.LABEL_SOURCES:
            self._refuse("label_source", f"must be one of {', '.join(reader.LABEL_SOURCES)} or "
                                         f"null")
        try:
            pattern = re.compile(self.label_pattern)
        except (re.error, TypeError) as error:
            self._refuse("label_pattern", f"is not a regular expression ({error})")
        if "label" not in pattern.groupindex and pattern.groups != 1:
            self._refuse("label_pattern", "needs a group named `label` (?P<label>...) or exactly "
                                          "one group")
        tenths = self.split_tenths
        if (not isinstance(tenths, tuple) or len(tenths) != 3 or not all(_is_int(t) for t in tenths)
                or sum(tenths) != 10 or min(tenths) < 1):
            self._refuse("split_tenths", "must be three positive whole parts of 10")

    @property
    def compiled_label_pattern(self) -> re.Pattern:
        return re.compile(self.label_pattern)

    def to_json(self, **cache_keys: str) -> str:
        """The component's parameter; cache_keys (CACHE_KEYS) only change TFX's cache key."""
        unknown = sorted(set(cache_keys) - set(CACHE_KEYS))
        if unknown:
            raise ValueError(f"unknown cache keys {unknown}; known: {list(CACHE_KEYS)}")
        return json.dumps(dict(dataclasses.asdict(self), **cache_keys), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "MicrographConfig":
        """Parse the component's JSON; unknown fields are refused by name."""
        options = {key: value for key, value in json.loads(text).items() if key not in CACHE_KEYS}
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"micrograph_config has unknown fields {unknown}; known: {sorted(known)}")
        missing = sorted(name for name in ("root", "material") if name not in options)
        if missing:
            raise ValueError(f"micrograph_config lacks the required fields {missing}")
        return cls(**options)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# ------------------------------------------------------------------------------ files


def list_files(root: str) -> List[Tuple[str, str]]:
    """(path, path relative to root with `/`) of every file under root, sorted; hidden files
    and folders (names starting with a dot) are skipped. tf.io.gfile also reads gs:// roots."""
    found = []
    for folder, subfolders, names in tf.io.gfile.walk(root):
        subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
        for name in sorted(names):
            if name.startswith("."):
                continue
            path = os.path.join(folder, name)
            found.append((path, os.path.relpath(path, root).replace(os.sep, "/")))
    return sorted(found, key=lambda item: item[1])


def folder_fingerprint(root: str) -> str:
    """Hash of every file's relative path, size and modification time: put it in the
    component's JSON (`to_json(folder_fingerprint=...)`) so that TFX's cache sees new,
    removed or changed files, which its parameters alone do not show."""
    digest = hashlib.sha256()
    for path, relative in list_files(root):
        stat = tf.io.gfile.stat(path)
        digest.update(f"{relative}\0{stat.length}\0{stat.mtime_nsec}\n".encode())
    return digest.hexdigest()[:16]


def split_of_file(relative_path: str, split_tenths: Tuple[int, int, int]) -> str:
    """The split of every tile of a file: a hash of its relative path picks one of ten slots,
    dealt train:eval:test as split_tenths (components.synthesis.executor.split_pattern)."""
    slot = int.from_bytes(hashlib.sha256(relative_path.encode()).digest()[:8], "big") % 10
    return SPLITS[split_pattern(split_tenths)[slot]]


@contextlib.contextmanager
def _local_copy(path: str) -> Iterator[str]:
    """A local path of the file: itself, or a temporary copy of a remote (gs://) one, since
    rosettasciio and h5py read local files only."""
    if os.path.exists(path):
        yield path
        return
    folder = tempfile.mkdtemp(prefix="micrograph_")
    try:
        local = os.path.join(folder, os.path.basename(path))
        tf.io.gfile.copy(path, local)
        yield local
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# --------------------------------------------------------------------------- one file


@dataclasses.dataclass
class FileResult:
    record: Dict[str, Any]  # one row of the report
    examples: List[Tuple[str, bytes]]  # (split, serialized tf.Example) of its tiles


def _pixel_size(raw: reader.RawMicrograph, config: MicrographConfig,
                record: Dict[str, Any]) -> Tuple[Tuple[float, float], str]:
    """((row, col) pm, source): the metadata's, else the lattice estimate, else the fallback.
    Raises BadMicrograph when the metadata's is absurd or there is none at all."""
    if raw.pixel_size_pm is not None:
        for value in raw.pixel_size_pm:
            reader.check_pixel_size(value, config.plausible_pixel_size_pm, "metadata")
        return raw.pixel_size_pm, "metadata"
    why = ["no pixel size in the file's metadata"]
    if config.estimate_pixel_size:
        try:
            estimate = estimate_pixel_size(raw.image, config.material, config.estimate_tolerance)
            record.update(estimated_pixel_size_pm=round(estimate.pixel_size_pm, 4),
                          estimate_shape_error=round(estimate.shape_error, 4))
            reader.check_pixel_size(estimate.pixel_size_pm, config.plausible_pixel_size_pm,
                                    "estimated")
            record["notes"].append(f"{why[0]}: estimated {estimate.pixel_size_pm:.4g} pm from "
                                   f"the lattice")
            return (estimate.pixel_size_pm,) * 2, "estimated"
        except (PixelSizeUnknown, reader.BadMicrograph) as error:
            why.append(f"no estimate from the lattice ({error})")
    else:
        why.append("estimate_pixel_size is off")
    if config.fallback_pixel_size_pm is not None:
        record["notes"].append(
            "; ".join(why) + f": fallback {config.fallback_pixel_size_pm:g} pm used")
        return (config.fallback_pixel_size_pm,) * 2, "fallback"
    why.append("no fallback_pixel_size_pm configured")
    raise reader.BadMicrograph(reader.NO_PIXEL_SIZE, "; ".join(why))


def process_file(path: str, relative_path: str, config: MicrographConfig,
                 ser_files: Sequence[str] = ()) -> FileResult:
    """Every example of one file, or none and the reason it was set aside. For a TIA .emi,
    `ser_files` are those of its acquisition (reader.ser_files_by_emi): with them it is their
    companion, which gives no examples (its images are in them); without, it is quarantined."""
    split = split_of_file(relative_path, config.split_tenths)
    record: Dict[str, Any] = dict(path=path, relative_path=relative_path, status="ok", reason="",
                                  detail="", split=split, notes=[])
    try:
        stem, extension = os.path.splitext(os.path.basename(relative_path))
        if extension.lower() == reader.TIA_METADATA_EXTENSION:
            if not ser_files:
                raise reader.BadMicrograph(
                    reader.EMI_WITHOUT_SER, f"no {stem}_1.ser (nor any {stem}_<n>.ser) beside it: "
                                            f"the .emi holds only metadata; the image is missing")
            record.update(status=COMPANION, ser_files=list(ser_files),
                          detail=f"TIA metadata; its images are read from {', '.join(ser_files)}")
            return FileResult(record, [])
        with _local_copy(path) as local:
            raw = reader.read_micrograph(local)
        record["notes"].extend(raw.notes)
        reader.check_pixels(raw.image)
        record.update(height=raw.image.shape[0], width=raw.image.shape[1])
        pixel_size, source = _pixel_size(raw, config, record)
        record.update(pixel_size_source=source,
                      source_pixel_size_pm=round(sum(pixel_size) / 2, 4))
        shape = reader.resampled_shape(raw.image.shape, pixel_size, config.target_pixel_size_pm)
        if shape[0] * shape[1] > config.max_frame_pixels:
            raise reader.BadMicrograph(reader.TOO_LARGE, f"{shape[0]} x {shape[1]} pixels after "
                                       f"resampling, over max_frame_pixels {config.max_frame_pixels}")
        if min(shape) < config.min_size:
            raise reader.BadMicrograph(reader.TOO_SMALL, f"{shape[0]} x {shape[1]} pixels after "
                                       f"resampling, under min_size {config.min_size}")
        image, exact_pm = reader.resample(raw.image, pixel_size, config.target_pixel_size_pm)
        label, note = reader.label_for(relative_path, config.label_source,
                                       config.compiled_label_pattern)
        if note:
            record["notes"].append(note)
        examples = []
        for origin, tile in reader.cut_tiles(image, config.tile_size, config.overlap):
            micrograph = contract.Micrograph(
                image=tile, material=config.material, label=label, pixel_size_pm=exact_pm,
                source=path, tile_origin=origin, source_pixel_size_pm=sum(pixel_size) / 2,
                pixel_size_source=source)
            examples.append(
                (split, contract.to_example(micrograph).SerializeToString(deterministic=True)))
    except reader.BadMicrograph as error:
        record.update(status="quarantined", reason=error.reason, detail=error.detail)
        return FileResult(record, [])
    except Exception as error:  # noqa: BLE001 - one file must never stop the run
        record.update(status="quarantined", reason=FAILED,
                      detail=f"{type(error).__name__}: {error}".replace("\n", " "))
        return FileResult(record, [])
    record.update(label=label, resampled_height=image.shape[0], resampled_width=image.shape[1],
                  pixel_size_pm=round(exact_pm, 4), tiles=len(examples))
    return FileResult(record, examples)


# ----------------------------------------------------------------------------- report


def build_report(records: List[Dict[str, Any]], config: MicrographConfig) -> Dict[str, Any]:
    """quarantine.json: every file set aside and why, the TIA .emi files read through their
    .ser files, the counts, and the pixel sizes that were estimated from the lattice (used or
    not)."""
    records = sorted(records, key=lambda r: r["relative_path"])
    quarantined = [r for r in records if r["status"] == "quarantined"]
    used = [r for r in records if r["status"] == "ok"]
    companions = [r for r in records if r["status"] == COMPANION]
    by_reason: Dict[str, int] = {}
    for record in quarantined:
        by_reason[record["reason"]] = by_reason.get(record["reason"], 0) + 1
    by_source: Dict[str, int] = {}
    for record in used:
        by_source[record["pixel_size_source"]] = by_source.get(record["pixel_size_source"], 0) + 1
    return dict(
        root=config.root,
        material=config.material,
        config=dataclasses.asdict(config),
        files=len(records),
        files_used=len(used),
        files_quarantined=len(quarantined),
        files_companion=len(companions),
        quarantined_by_reason=dict(sorted(by_reason.items())),
        examples_by_split={split: sum(r["tiles"] for r in used if r["split"] == split)
                           for split in SPLITS},
        files_by_split={split: sum(1 for r in used if r["split"] == split) for split in SPLITS},
        pixel_size_sources=dict(sorted(by_source.items())),
        quarantined=[{key: r[key] for key in QUARANTINE_COLUMNS} for r in quarantined],
        companions=[{key: r[key] for key in ("relative_path", "ser_files", "path")}
                    for r in companions],
        estimated_pixel_sizes=[
            dict(relative_path=r["relative_path"],
                 estimated_pixel_size_pm=r["estimated_pixel_size_pm"],
                 shape_error=r["estimate_shape_error"],
                 used=r.get("pixel_size_source") == "estimated")
            for r in records if "estimated_pixel_size_pm" in r],
        file_records=records,
    )


def write_report(report: Dict[str, Any], folder: str) -> None:
    with tf.io.gfile.GFile(os.path.join(folder, QUARANTINE_JSON), "w") as handle:
        handle.write(json.dumps(report, indent=1))
    with tf.io.gfile.GFile(os.path.join(folder, QUARANTINE_CSV), "w") as handle:
        writer = csv.writer(handle)
        writer.writerow(QUARANTINE_COLUMNS)
        writer.writerows([row[key] for key in QUARANTINE_COLUMNS] for row in report["quarantined"])


def summary(report: Dict[str, Any]) -> str:
    """The run summary: counts, and every file set aside with its reason."""
    lines = [f"MicrographExampleGen: {report['files']} files under {report['root']}: "
             f"{report['files_used']} used, {report['files_companion']} TIA .emi beside their "
             f".ser, {report['files_quarantined']} quarantined "
             f"{report['quarantined_by_reason']}; examples {report['examples_by_split']}; "
             f"pixel sizes from {report['pixel_size_sources']}"]
    lines += [f"  quarantined {row['relative_path']}: {row['reason']}: {row['detail']}"
              for row in report["quarantined"]]
    return "\n".join(lines)


class Executor(base_beam_executor.BaseBeamExecutor):

    def Do(self, input_dict: Dict[str, List[types.Artifact]],
           output_dict: Dict[str, List[types.Artifact]],
           exec_properties: Dict[str, Any]) -> None:
        config = MicrographConfig.from_json(exec_properties["micrograph_config"])
        files = list_files(config.root)
        ser_files = reader.ser_files_by_emi(relative for _, relative in files)
        examples = artifact_utils.get_single_instance(output_dict["examples"])
        examples.split_names = artifact_utils.encode_split_names(list(SPLITS))
        examples.set_string_custom_property(
            "payload_format", example_gen_pb2.PayloadFormat.Name(example_gen_pb2.FORMAT_TF_EXAMPLE))
        quarantine = artifact_utils.get_single_instance(output_dict["quarantine"])
        records_dir = os.path.join(self._get_tmp_dir(), "file_records")

        with self._make_beam_pipeline() as pipeline:
            results = (
                pipeline
                | "Files" >> beam.Create(files, reshuffle=True)
                | "Read" >> beam.Map(
                    lambda item: process_file(*item, config, ser_files.get(item[1], ())))
            )
            write_splits(results | "Examples" >> beam.FlatMap(lambda result: result.examples),
                         examples.uri)
            _ = (
                results
                | "Records" >> beam.Map(lambda result: json.dumps(result.record))
                | "WriteRecords" >> beam.io.WriteToText(os.path.join(records_dir, "records"))
            )

        records = [json.loads(line)
                   for path in sorted(tf.io.gfile.glob(os.path.join(records_dir, "records*")))
                   for line in tf.io.gfile.GFile(path).read().splitlines() if line.strip()]
        report = build_report(records, config)
        write_report(report, quarantine.uri)
        for name in ("files", "files_used", "files_quarantined", "files_companion"):
            quarantine.set_int_custom_property(name, report[name])
        logging.info(summary(report))
        for row in report["quarantined"]:
            logging.warning("quarantined %s: %s: %s", row["path"], row["reason"], row["detail"])
        for record in report["file_records"]:
            if record.get("pixel_size_source") in ("estimated", "fallback"):
                logging.warning("%s: no pixel size in its metadata; %s %.4g pm used", record["path"],
                                record["pixel_size_source"], record["source_pixel_size_pm"])
        if report["files_used"] == 0:
            raise RuntimeError(
                f"no file under {config.root} gave an example ({report['files']} files, "
                f"quarantined {report['quarantined_by_reason']}); see "
                f"{os.path.join(quarantine.uri, QUARANTINE_JSON)}")
        empty = [split for split, count in report["examples_by_split"].items() if count == 0]
        if empty:
            logging.warning("MicrographExampleGen: splits %s have no examples (%d files used); "
                            "add files or change split_tenths", empty, report["files_used"])
