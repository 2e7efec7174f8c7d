"""Segment every micrograph in a folder tree with a SavedModel, tile by tile.

    python -m pipeline.segment_folder --model <SavedModel dir> --input <folder> --output <folder>
        [--tile 256] [--overlap 64] [--batch-size 8] [--format npy|tiff] [--heatmaps]
        [--no-standardise] [--overwrite]

Reads `.tif`/`.tiff` (tifffile), `.png` (Pillow) and `.npy` files anywhere under `--input`
(RGB(A) images become intensity by averaging the colour channels; alpha is ignored), runs
`components.segmentation.tiling.predict_tiled` on each, and writes under `--output`, in the
same sub-folders as the input:

- `<stem>_maps.npy` (float16, C x H x W) or, with `--format tiff`, `<stem>_maps.tif` (float32,
  one page per class); channels in the order of `DEFECT_CLASSES`;
- `<stem>_overlay.png`: the input with each class coloured where its probability exceeds 0.5;
- with `--heatmaps`, also `<stem>_combined.png` and `<stem>_per_class.png` (the paper's
  Figures 2 and 3, `components/segmentation/heatmaps.py`);
- `summary.csv`: one row per input file, written as it goes: `path` (relative to `--input`),
  `height`, `width`, `seconds` (reading, predicting and writing that file), per class
  `<class>_area_fraction` (share of pixels above 0.5) and `<class>_max_probability`, and
  `error` (empty, or why the file could not be segmented).

Two inputs with the same stem in one folder (`a.tif`, `a.png`) are told apart by their
extension (`a_tif_maps.npy`, `a_png_maps.npy`). Files under `--output` named as this command's
outputs are never taken as inputs (the output folder may lie inside the input folder).

A file that cannot be read is listed in `summary.csv` with its error, named on stderr, and the
command goes on; a predictor whose answer has the wrong shape stops it. No existing file is
overwritten: before anything is computed, the command stops with a message naming the first
output file that already exists, unless `--overwrite` is given.

Exit status: 0 when every file was segmented, 1 when some could not be (or there were none),
2 for a usage error or an output file that already exists.

The model: a TF SavedModel whose signature `serving_standardised` takes a float32 [N, H, W]
batch of already standardised tiles named `images` and returns `probabilities` [N, H, W, C]
(`load_predictor`). Each frame is standardised once, as a whole, before it is tiled, as a
training image is before its tiles are cut (`--no-standardise`: the files hold standardised
frames already); the model must not standardise each tile again by its own statistics (see
`components/segmentation/tiling.py`). A model exported before that signature existed has
only `serving_images`, which does exactly that: it is still used, with a warning. A model
that reads the teacher's deviation map beside the image (the default since the U-Net's
`inputs` option) also takes `deviation_z` tiles: the command computes each frame's map with
the pseudo-labeller, block by block on every CPU
(`components.segmentation.tiling.deviation_map`), and cuts it into the same tiles.
Everything else works with any `predict_batch` callable, so `main(argv, predictor=...)` runs
without a model.
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import sys
import time
from dataclasses import dataclass
from typing import IO, Callable, Dict, List, Optional, Sequence

import numpy as np

from components.defects import DEFECT_CLASSES
from components.segmentation import serving
from components.segmentation.tiling import PredictorOutputError, deviation_map, predict_tiled

SIGNATURE = serving.STANDARDISED_SIGNATURE
# Older exports: standardises every tile by itself (the frame's standardisation is then lost).
PER_TILE_SIGNATURE = serving.IMAGES_SIGNATURE
OUTPUT_NAME = serving.PROBABILITIES
EXTENSIONS = (".tif", ".tiff", ".png", ".npy")
SUMMARY = "summary.csv"
THRESHOLD = 0.5

PredictBatch = Callable[[np.ndarray], np.ndarray]


class OutputExists(Exception):
    """An output file is already there and --overwrite was not given."""


def load_predictor(model_dir: str) -> PredictBatch:
    """predict_batch of a SavedModel: float32 (N, H, W) standardised tiles (and, for a model
    that reads the teacher's deviation map, their (N, H, W) deviation tiles) -> float32
    (N, H, W, C) probabilities, through its `serving_standardised` signature, or (with a
    warning on stderr) the per-tile standardising `serving_images` of an older export. Its
    attribute `needs_deviation` says whether the deviation tiles are wanted."""
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    import tensorflow as tf

    model = tf.saved_model.load(model_dir)
    if SIGNATURE in model.signatures:
        name = SIGNATURE
    elif PER_TILE_SIGNATURE in model.signatures:
        name = PER_TILE_SIGNATURE
        print(f"warning: the SavedModel at {model_dir} has no {SIGNATURE!r} signature (an "
              f"older export); its {PER_TILE_SIGNATURE!r} standardises every tile by itself, so "
              f"overlapping tiles may disagree: export it again", file=sys.stderr)
    else:
        raise ValueError(f"the SavedModel at {model_dir} has no signature {SIGNATURE!r} "
                         f"(nor {PER_TILE_SIGNATURE!r}; it has: "
                         f"{', '.join(sorted(model.signatures)) or 'none'})")
    serve = model.signatures[name]

    def predict_batch(images: np.ndarray, deviation_z: Optional[np.ndarray] = None) -> np.ndarray:
        answer = serve(**serving.signature_arguments(serve, images, deviation_z, source=model_dir))
        if OUTPUT_NAME not in answer:
            raise PredictorOutputError(f"signature {name!r} of {model_dir} returned "
                                       f"{sorted(answer)}, not {OUTPUT_NAME!r}")
        return answer[OUTPUT_NAME].numpy()

    predict_batch.model = model  # keeps the loaded objects alive with the function
    predict_batch.needs_deviation = serving.takes_deviation(serve)
    return predict_batch


def read_micrograph(path: str) -> np.ndarray:
    """A 2-D intensity image from a .tif/.tiff, .png or .npy file.

    RGB(A) (H, W, 3|4) becomes the mean of its three colour channels; grey with alpha (H, W, 2)
    its grey channel; singleton axes are dropped. Anything else raises ValueError.
    """
    extension = os.path.splitext(path)[1].lower()
    if extension in (".tif", ".tiff"):
        import tifffile

        array = tifffile.imread(path)
    elif extension == ".png":
        from PIL import Image

        with Image.open(path) as picture:
            if picture.mode in ("P", "PA", "1", "CMYK", "YCbCr", "LAB", "HSV"):
                picture = picture.convert("RGBA" if "A" in picture.mode or
                                          "transparency" in picture.info else "RGB")
            array = np.asarray(picture)
    elif extension == ".npy":
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    else:
        raise ValueError(f"unsupported file type {extension!r} (expected {', '.join(EXTENSIONS)})")
    if array.ndim > 2:
        array = array.squeeze() if array.ndim > 3 or array.shape[-1] not in (2, 3, 4) else array
    if array.ndim == 3 and array.shape[-1] in (3, 4):
        array = array[..., :3].astype(np.float32).mean(axis=-1)
    elif array.ndim == 3 and array.shape[-1] == 2:
        array = array[..., 0]
    if array.ndim != 2:
        raise ValueError(f"expected one 2-D image (H, W) or RGB(A) (H, W, 3|4), got shape "
                         f"{array.shape}")
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)
            or array.dtype == np.bool_):
        raise ValueError(f"expected a real-valued image, got dtype {array.dtype}")
    return array


OUTPUT_SUFFIXES = ("_maps.npy", "_maps.tif", "_overlay.png", "_combined.png", "_per_class.png")


def _inside(path: str, folder: str) -> bool:
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def find_micrographs(folder: str, output_dir: Optional[str] = None) -> List[str]:
    """Every file under `folder` with a micrograph extension, sorted. Hidden folders are not
    searched, nor are this command's own outputs (files under `output_dir` whose names end as
    its outputs do), so an output folder inside the input folder, or the input folder itself,
    is not read back as input."""
    found = []
    for root, folders, files in os.walk(folder):
        folders[:] = sorted(d for d in folders if not d.startswith("."))
        own = output_dir is not None and _inside(root, output_dir)
        found += [os.path.join(root, name) for name in sorted(files)
                  if os.path.splitext(name)[1].lower() in EXTENSIONS
                  and not (own and name.endswith(OUTPUT_SUFFIXES))]
    return found


@dataclass
class Job:
    source: str
    relative: str  # to the input folder, as the summary names it
    outputs: Dict[str, str]  # kind -> output file


def plan(inputs: Sequence[str], input_dir: str, output_dir: str, fmt: str,
         heatmaps: bool) -> List[Job]:
    """Output files of every input; stems shared within a folder get their extension added."""
    relatives = [os.path.relpath(path, input_dir) for path in inputs]
    stems: Dict[str, int] = {}
    for relative in relatives:
        key = os.path.splitext(relative)[0]
        stems[key] = stems.get(key, 0) + 1
    jobs = []
    for source, relative in zip(inputs, relatives):
        stem, extension = os.path.splitext(relative)
        if stems[stem] > 1:
            stem = f"{stem}_{extension.lstrip('.').lower()}"
        base = os.path.join(output_dir, stem)
        outputs = {"maps": base + ("_maps.npy" if fmt == "npy" else "_maps.tif"),
                   "overlay": base + "_overlay.png"}
        if heatmaps:
            outputs["combined"] = base + "_combined.png"
            outputs["per_class"] = base + "_per_class.png"
        jobs.append(Job(source, relative, outputs))
    return jobs


def _open(path: str, overwrite: bool) -> IO[bytes]:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    try:
        return open(path, "wb" if overwrite else "xb")
    except FileExistsError:
        raise OutputExists(path) from None


def write_maps_npy(maps: np.ndarray, handle: IO[bytes]) -> None:
    """C x H x W float16, one channel converted at a time."""
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float16)),
              "fortran_order": False, "shape": maps.shape}
    np.lib.format.write_array_header_1_0(handle, header)
    for channel in maps:
        handle.write(np.ascontiguousarray(channel, dtype=np.float16).tobytes())


def write_maps_tiff(maps: np.ndarray, handle: IO[bytes], class_names: Sequence[str]) -> None:
    """C x H x W float32, one page per class; the class names in the JSON description."""
    import tifffile

    tifffile.imwrite(handle, np.ascontiguousarray(maps, dtype=np.float32),
                     photometric="minisblack",
                     metadata={"axes": "CYX", "classes": list(class_names)})


def summary_columns(class_names: Sequence[str]) -> List[str]:
    columns = ["path", "height", "width", "seconds"]
    for name in class_names:
        columns += [f"{name}_area_fraction", f"{name}_max_probability"]
    return columns + ["error"]


def segment_one(job: Job, predictor: PredictBatch, args: argparse.Namespace,
                class_names: Sequence[str]) -> Dict[str, object]:
    """Segment one file and write its outputs; its summary row. On an error the outputs this
    call had created are removed again, and the error is raised."""
    from components.segmentation import heatmaps

    created: List[str] = []

    def output(kind: str) -> IO[bytes]:
        handle = _open(job.outputs[kind], args.overwrite)
        created.append(job.outputs[kind])
        return handle

    start = time.perf_counter()
    try:
        image = read_micrograph(job.source)
        deviation = deviation_map(image) if getattr(predictor, "needs_deviation", False) else None
        maps = predict_tiled(image, predictor, tile=args.tile, overlap=args.overlap,
                             batch_size=args.batch_size, num_classes=len(class_names),
                             standardise=args.standardise, deviation=deviation)
        with output("maps") as handle:
            if args.format == "npy":
                write_maps_npy(maps, handle)
            else:
                write_maps_tiff(maps, handle, class_names)
        with output("overlay") as handle:
            heatmaps.overlay_png(image, maps, handle, class_names=class_names)
        if args.heatmaps:
            with output("combined") as handle:
                heatmaps.combined_figure(image, maps, handle, title=job.relative)
            with output("per_class") as handle:
                heatmaps.per_class_figure(image, maps, handle, class_names=class_names,
                                          title=job.relative)
    except BaseException:
        for path in created:
            if os.path.exists(path):
                os.remove(path)
        raise
    row: Dict[str, object] = {"path": job.relative, "height": image.shape[0],
                              "width": image.shape[1]}
    for name, channel in zip(class_names, maps):
        above = np.count_nonzero(channel > THRESHOLD)
        row[f"{name}_area_fraction"] = f"{above / channel.size:.6g}"
        row[f"{name}_max_probability"] = f"{float(channel.max()):.4f}"
    row["seconds"] = f"{time.perf_counter() - start:.3f}"
    row["error"] = ""
    return row


def parse_args(argv: Optional[Sequence[str]], need_model: bool) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.segment_folder",
        description="Segment every micrograph (.tif, .tiff, .png, .npy) in a folder tree tile "
                    "by tile; write per-class maps, overlays and summary.csv.")
    parser.add_argument("--model", required=need_model,
                        help=f"SavedModel directory with a {SIGNATURE!r} signature")
    parser.add_argument("--input", required=True, help="folder searched for micrographs")
    parser.add_argument("--output", required=True, help="folder for the maps, overlays, CSV")
    parser.add_argument("--tile", type=int, default=256, help="tile side in pixels (256)")
    parser.add_argument("--overlap", type=int, default=64,
                        help="least overlap of neighbouring tiles in pixels (64)")
    parser.add_argument("--batch-size", type=int, default=8, help="tiles per model call (8)")
    parser.add_argument("--format", choices=("npy", "tiff"), default="npy",
                        help="per-class maps as float16 .npy (default) or float32 .tif")
    parser.add_argument("--heatmaps", action="store_true",
                        help="also write <stem>_combined.png and <stem>_per_class.png")
    parser.add_argument("--no-standardise", dest="standardise", action="store_false",
                        help="the frames are standardised already (default: standardise each "
                             "whole frame once)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    args = parser.parse_args(argv)
    if args.tile < 1 or not 0 <= args.overlap < args.tile or args.batch_size < 1:
        parser.error("need --tile >= 1, 0 <= --overlap < --tile and --batch-size >= 1")
    if not os.path.isdir(args.input):
        parser.error(f"--input {args.input} is not a folder")
    return args


def main(argv: Optional[Sequence[str]] = None, predictor: Optional[PredictBatch] = None) -> int:
    """The command; `predictor` replaces the SavedModel (then --model is not needed)."""
    args = parse_args(argv, need_model=predictor is None)
    class_names = DEFECT_CLASSES
    inputs = find_micrographs(args.input, output_dir=args.output)
    if not inputs:
        print(f"error: no micrographs ({', '.join(EXTENSIONS)}) under {args.input}",
              file=sys.stderr)
        return 1
    jobs = plan(inputs, args.input, args.output, args.format, args.heatmaps)
    summary_path = os.path.join(args.output, SUMMARY)
    if not args.overwrite:
        for path in [summary_path] + [p for job in jobs for p in job.outputs.values()]:
            if os.path.exists(path):
                print(f"error: {path} already exists; nothing was written "
                      f"(pass --overwrite to replace outputs)", file=sys.stderr)
                return 2
    if predictor is None:
        predictor = load_predictor(args.model)

    failed = 0
    try:
        with io.TextIOWrapper(_open(summary_path, args.overwrite), encoding="utf-8",
                              newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=summary_columns(class_names))
            writer.writeheader()
            for index, job in enumerate(jobs, 1):
                start = time.perf_counter()
                try:
                    row = segment_one(job, predictor, args, class_names)
                except (PredictorOutputError, OutputExists):
                    raise
                except Exception as error:  # noqa: BLE001 - one bad file must not stop the rest
                    failed += 1
                    reason = f"{type(error).__name__}: {error}".replace("\n", " ")
                    print(f"error: {job.source}: {reason} (listed in {summary_path}; "
                          f"going on)", file=sys.stderr)
                    row = {"path": job.relative, "error": reason,
                           "seconds": f"{time.perf_counter() - start:.3f}"}
                else:
                    print(f"[{index}/{len(jobs)}] {job.relative}: {row['height']} x "
                          f"{row['width']} in {row['seconds']} s -> "
                          f"{os.path.relpath(job.outputs['maps'], args.output)}")
                writer.writerow(row)
                handle.flush()
    except OutputExists as error:
        print(f"error: {error} already exists (pass --overwrite to replace outputs); "
              f"stopped", file=sys.stderr)
        return 2
    except PredictorOutputError as error:
        print(f"error: the model's answer does not fit: {error}; stopped", file=sys.stderr)
        return 1
    print(f"{len(jobs) - failed} of {len(jobs)} micrographs segmented; summary: {summary_path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
