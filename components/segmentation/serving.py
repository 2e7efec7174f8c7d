"""How to call an exported U-Net: its signatures' names and the arguments they take.

The Trainer module (`modules/segmenter.py`) exports the signatures; the SegmentationEvaluator,
the DefectClusterer, `pipeline.segment_folder` and the benchmarks call them. A segmenter
trained with the teacher's deviation map as an input channel takes that map beside each
image, so the callers ask the signature what it takes instead of assuming.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import numpy as np
import tensorflow as tf

PROBABILITIES = "probabilities"
IMAGES = "images"
DEVIATION = "deviation_z"  # the pseudo-labeller's deviation map, noise sigmas (the contract's)
EXAMPLES = "examples"
IMAGES_SIGNATURE = "serving_images"  # raw images, each standardised by itself
STANDARDISED_SIGNATURE = "serving_standardised"  # tiles of a frame standardised as a whole


def takes_deviation(signature) -> bool:
    """Whether an exported signature asks for the teacher's deviation map."""
    return DEVIATION in signature.structured_input_signature[1]


def signature_arguments(signature, images: np.ndarray, deviation_z: Optional[np.ndarray] = None,
                        source: str = "") -> Dict[str, Any]:
    """The keyword arguments of `signature` (`serving_images` or `serving_standardised`) for
    [N, H, W] images and, when it takes it, their [N, H, W] deviation maps; ValueError naming
    `source` when the signature needs the maps and none are given."""
    arguments = {IMAGES: tf.constant(images, tf.float32)}
    if takes_deviation(signature):
        if deviation_z is None:
            raise ValueError(f"{source or 'the images'}: this segmenter reads the pseudo-labeller's "
                             f"{DEVIATION} beside each image, and none was given (run the "
                             f"PseudoLabeler first, or train the segmenter with inputs ['image'])")
        arguments[DEVIATION] = tf.constant(deviation_z, tf.float32)
    return arguments
