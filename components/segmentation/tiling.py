"""Sliding-window segmentation of a frame of any size, with overlap blending and bounded memory.

A segmentation model sees tiles of a fixed size (256 x 256 by default, the simulator's frame);
a real micrograph may be 4096 x 4096 or any other size. `predict_tiled` covers the frame with
overlapping tiles, asks `predict_batch` about them a batch at a time, and blends the answers
with a smooth window, so the result has no seams at the tile borders.

- Tiles. Along each axis tiles start every `tile - overlap` pixels; the last tile is shifted
  inward so that it ends at the frame's edge (every tile is full-size, none is padded). An axis
  shorter than a tile is reflect-padded to one tile (centred), and the padding is cut off again.
- Blending. Each tile's output is multiplied by a window, added into a weighted sum, and the
  window into a weight sum; the result is the sum over the weights. The window is the product
  of two 1-D profiles that rise as a raised cosine over the first `overlap` pixels of a tile,
  stay at 1 in the middle and fall the same way over the last `overlap` pixels. It is positive
  everywhere (its smallest value, at a tile's outermost pixel, is sin^2(pi / (4 * overlap)),
  1.5e-4 for an overlap of 64), so every pixel is covered by a positive weight; and a side of a
  tile that lies on the frame's edge is not tapered at all, since no other tile covers those
  pixels. Where two regularly spaced tiles overlap, their ramps add up to exactly 1 (a partition
  of unity): the blend is a smooth cross-fade, and a tile's outermost pixels, where a
  convolutional network sees the least context, count almost nothing.
- Standardisation. With `standardise=True` (the default) the frame is standardised once, with
  the mean and standard deviation of the whole frame, and every tile is cut from that one
  standardised frame. Standardising each tile by its own statistics would give the same pixel
  a different intensity in each of the tiles that overlap it (a tile with vacuum, a grain
  boundary or a bright defect in it is scaled differently from its neighbour), so overlapping
  predictions would disagree and the blend would show it; it would also hide a region's
  contrast relative to the rest of the frame. A model that itself standardises each input
  image undoes this, tile by tile (standardisation ignores any earlier shift and scale), so
  the predictor must feed the tiles to the network as they are: the U-Net's
  `serving_standardised` signature (`modules/segmenter.py`), not its `serving_images`. This
  is also what the network was trained on: whole images standardised, then tiled.
- Memory. Only the output accumulators (C x H x W float32 for the weighted sum, H x W float32
  for the weights; the sum is normalised in place and returned) and one batch of tiles and its
  predictions are held. Tiles are generated lazily, batch by batch; the frame is never copied
  as a whole (the statistics are computed in row blocks, and each tile is standardised when it
  is cut), so a memory-mapped input (`np.load(..., mmap_mode="r")`) is read piece by piece.
  An axis shorter than a tile is the exception: the padded frame (at most `tile` pixels along
  that axis) is built once.

Plain NumPy: no TensorFlow, no TFX.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import numpy as np

PredictBatch = Callable[[np.ndarray], np.ndarray]

# Pixels per block when the frame's statistics are computed block by block (a 16 MB float64
# temporary at most).
_STATISTICS_BLOCK_PIXELS = 1 << 21


class PredictorOutputError(ValueError):
    """The predictor answered with the wrong shape: a fault of the model, not of one frame."""


def _axis_origins(length: int, tile: int, overlap: int) -> List[int]:
    if length <= tile:
        return [0]
    stride = tile - overlap
    origins = list(range(0, length - tile, stride))
    origins.append(length - tile)
    return origins


def _check_geometry(tile: int, overlap: int) -> None:
    if int(tile) != tile or tile < 1:
        raise ValueError(f"tile must be a positive integer, got {tile!r}")
    if int(overlap) != overlap or not 0 <= overlap < tile:
        raise ValueError(f"overlap must be an integer in [0, tile), got {overlap!r} "
                         f"for tile {tile}")


def tile_origins(shape: Sequence[int], tile: int, overlap: int) -> List[Tuple[int, int]]:
    """(row, column) of the top-left corner of every tile of a frame of `shape` (H, W).

    Along each axis tiles start every `tile - overlap` pixels and the last one is shifted
    inward to end at the frame's edge, so all tiles are full-size and neighbours overlap by at
    least `overlap` pixels. An axis no longer than a tile has the one origin 0 (`predict_tiled`
    pads such an axis to one tile). Row-major order.
    """
    _check_geometry(tile, overlap)
    height, width = (int(n) for n in shape[:2])
    if height < 1 or width < 1:
        raise ValueError(f"empty frame: shape {tuple(shape)}")
    rows = _axis_origins(height, tile, overlap)
    columns = _axis_origins(width, tile, overlap)
    return [(row, column) for row in rows for column in columns]


def _ramp(tile: int, overlap: int, taper_start: bool, taper_end: bool) -> np.ndarray:
    """1-D window: raised-cosine ramps over `overlap` pixels at the tapered ends, 1 elsewhere."""
    profile = np.ones(tile, np.float64)
    width = min(overlap, tile // 2)
    if width > 0:
        # sin^2 over pixel centres: w(i) + w(width - 1 - i) = 1, and w > 0 everywhere.
        rise = np.sin(0.5 * np.pi * (np.arange(width) + 0.5) / width) ** 2
        if taper_start:
            profile[:width] = rise
        if taper_end:
            profile[tile - width:] = np.minimum(profile[tile - width:], rise[::-1])
    return profile.astype(np.float32)


def blend_window(tile: int, overlap: int, top: bool = True, bottom: bool = True,
                 left: bool = True, right: bool = True) -> np.ndarray:
    """The (tile, tile) float32 weight of one tile; a side given False is left untapered."""
    _check_geometry(tile, overlap)
    return np.outer(_ramp(tile, overlap, top, bottom), _ramp(tile, overlap, left, right))


def frame_statistics(image: np.ndarray) -> Tuple[float, float]:
    """Mean and standard deviation of a whole frame, computed in row blocks (two passes).

    Raises ValueError when the frame has a NaN or an infinite value.
    """
    rows_per_block = max(1, _STATISTICS_BLOCK_PIXELS // max(1, image.shape[1]))
    total = 0.0
    for start in range(0, image.shape[0], rows_per_block):
        block = np.asarray(image[start:start + rows_per_block], dtype=np.float64)
        if not np.isfinite(block).all():
            bad = start + int(np.argwhere(~np.isfinite(block))[0][0])
            raise ValueError(f"the frame has a non-finite value (first in row {bad})")
        total += float(block.sum())
    mean = total / image.size
    squares = 0.0
    for start in range(0, image.shape[0], rows_per_block):
        block = np.asarray(image[start:start + rows_per_block], dtype=np.float64) - mean
        squares += float(np.einsum("ij,ij->", block, block))
    return mean, math.sqrt(squares / image.size)


def _pad_to_tile(image: np.ndarray, tile: int) -> Tuple[np.ndarray, Tuple[int, int]]:
    """Reflect-pad (centred) every axis shorter than a tile; the offsets of the frame in it."""
    height, width = image.shape
    pad_rows = max(0, tile - height)
    pad_columns = max(0, tile - width)
    if not pad_rows and not pad_columns:
        return image, (0, 0)
    top, left = pad_rows // 2, pad_columns // 2
    padded = np.pad(np.asarray(image, dtype=np.float32),
                    ((top, pad_rows - top), (left, pad_columns - left)), mode="reflect")
    return padded, (top, left)


def _cut(frame: np.ndarray, chunk: List[Tuple[int, int]], tile: int) -> np.ndarray:
    tiles = np.empty((len(chunk), tile, tile), np.float32)
    for index, (row, column) in enumerate(chunk):
        tiles[index] = frame[row:row + tile, column:column + tile]
    return tiles


def _batches(frame: np.ndarray, origins: List[Tuple[int, int]], tile: int, batch_size: int,
             offset: float, scale: float) -> Iterator[Tuple[List[Tuple[int, int]], np.ndarray]]:
    """Lazily: (origins, float32 (N, tile, tile) standardised tiles), N <= batch_size."""
    for start in range(0, len(origins), batch_size):
        chunk = origins[start:start + batch_size]
        tiles = _cut(frame, chunk, tile)
        if offset or scale != 1.0:
            tiles -= np.float32(offset)
            tiles *= np.float32(1.0 / scale)
        yield chunk, tiles


def predict_tiled(image: np.ndarray, predict_batch: PredictBatch, tile: int = 256,
                  overlap: int = 64, batch_size: int = 8, num_classes: Optional[int] = None,
                  standardise: bool = True, deviation: Optional[np.ndarray] = None) -> np.ndarray:
    """Per-class probabilities, float32 (C, H, W), of a frame of any size.

    image: 2-D array (H, W), any real dtype, possibly memory-mapped.
    predict_batch: any callable mapping float32 (N, tile, tile) to (N, tile, tile, C)
        probabilities (NumPy or anything `np.asarray` takes, a TF tensor included); N is at most
        `batch_size` and is smaller for the last batch.
    tile, overlap: tile side and the least overlap of neighbouring tiles, in pixels
        (0 <= overlap < tile); the blend ramps over `overlap` pixels (at most tile // 2).
    num_classes: C, checked against the predictor's answer when given.
    standardise: subtract the whole frame's mean and divide by its standard deviation (by 1
        for a constant frame) before tiling; see the module's docstring for why not per tile.
    deviation: a second (H, W) map of the same frame for a model that reads one (the
        teacher's deviation map, `deviation_map`): cut into the same tiles, as it is, and
        given to the predictor as its second argument, `predict_batch(tiles, deviation_tiles)`.

    Raises ValueError for a frame that is not 2-D or is empty, or (when standardising) has a
    non-finite value; PredictorOutputError when the predictor's answer has the wrong shape.
    """
    _check_geometry(tile, overlap)
    if int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    image = np.asarray(image) if not isinstance(image, np.ndarray) else image
    if image.ndim != 2:
        raise ValueError(f"expected a 2-D frame (H, W), got shape {image.shape}")
    if image.size == 0:
        raise ValueError(f"empty frame: shape {image.shape}")
    if not np.issubdtype(image.dtype, np.number) or np.iscomplexobj(image):
        raise ValueError(f"expected a real-valued frame, got dtype {image.dtype}")
    height, width = image.shape
    if deviation is not None and np.shape(deviation) != image.shape:
        raise ValueError(f"the deviation map's shape {np.shape(deviation)} is not the frame's "
                         f"{image.shape}")

    offset, scale = 0.0, 1.0
    if standardise:
        offset, scale = frame_statistics(image)
        scale = scale if scale > 0 else 1.0
    frame, (top, left) = _pad_to_tile(image, tile)
    if deviation is not None:
        deviation, _ = _pad_to_tile(deviation, tile)
    frame_height, frame_width = frame.shape
    origins = tile_origins(frame.shape, tile, overlap)
    windows = {}  # one window per combination of tapered sides (at most 16)

    total = None
    weight = np.zeros((frame_height, frame_width), np.float32)
    for chunk, tiles in _batches(frame, origins, tile, batch_size, offset, scale):
        answer = np.asarray(predict_batch(tiles) if deviation is None else
                            predict_batch(tiles, _cut(deviation, chunk, tile)))
        if (answer.ndim != 4 or answer.shape[:3] != (len(chunk), tile, tile)
                or (num_classes is not None and answer.shape[3] != num_classes)):
            classes = "C" if num_classes is None else str(num_classes)
            raise PredictorOutputError(
                f"the predictor answered shape {answer.shape} for a batch of shape {tiles.shape}; "
                f"expected ({len(chunk)}, {tile}, {tile}, {classes})")
        if total is None:
            num_classes = answer.shape[3]
            total = np.zeros((num_classes, frame_height, frame_width), np.float32)
        del tiles
        for (row, column), probabilities in zip(chunk, answer):
            sides = (row > 0, row + tile < frame_height, column > 0, column + tile < frame_width)
            if sides not in windows:
                windows[sides] = blend_window(tile, overlap, *sides)
            window = windows[sides]
            weight[row:row + tile, column:column + tile] += window
            region = total[:, row:row + tile, column:column + tile]
            region += np.moveaxis(probabilities, -1, 0).astype(np.float32, copy=False) * window
        del answer

    total /= weight  # in place: the weights are positive at every pixel
    del weight
    if frame is not image:  # an axis was padded: cut the frame out again
        total = np.ascontiguousarray(total[:, top:top + height, left:left + width])
    return total


DEVIATION_BLOCK = 512  # pixels: a few dozen unit cells, as the teacher needs; memory stays small
DEVIATION_OVERLAP = 64
DEVIATION_BLOCKS_PER_WORKER = 4


def deviation_map(image: np.ndarray, block: int = DEVIATION_BLOCK,
                  overlap: int = DEVIATION_OVERLAP, config=None,
                  workers: Optional[int] = None) -> np.ndarray:
    """The teacher's deviation map (`components.pseudo_labels`: the image minus its fitted
    bulk lattice, in noise sigmas), float32 (H, W), of a frame of any size, for a segmenter
    that reads it beside the image.

    The teacher runs on overlapping `block`-pixel blocks, blended as `predict_tiled` blends
    a model's tiles: a training image is one such block (256 pixels), the lattice is fitted
    where it is locally, and the memory stays that of a few blocks. Only the map is computed
    (`lattice.deviation_z`, not the labelling after it), on `workers` threads (default: one
    per CPU; the filters and FFTs release the GIL). A block without a lattice (vacuum,
    amorphous material) gives zeros, as the PseudoLabeler writes for such an image.
    Raises ValueError for a frame with a non-finite pixel.
    """
    from components.pseudo_labels.lattice import PseudoLabelConfig, deviation_z

    config = config or PseudoLabelConfig()
    workers = (os.cpu_count() or 1) if workers is None else workers
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    frame_statistics(image)  # ValueError for a NaN or an infinite pixel, naming its row

    def one(block_image: np.ndarray) -> np.ndarray:
        try:
            return deviation_z(block_image, config)
        except ValueError:  # no lattice in this block
            return np.zeros(block_image.shape, np.float32)

    with ThreadPoolExecutor(workers) as pool:
        def teacher(blocks: np.ndarray) -> np.ndarray:
            return np.stack(list(pool.map(one, blocks)))[..., np.newaxis]

        # a few blocks per worker and call, so that a slow block does not idle the others
        return predict_tiled(image, teacher, tile=block, overlap=overlap,
                             batch_size=DEVIATION_BLOCKS_PER_WORKER * workers, num_classes=1,
                             standardise=False)[0]
