"""Pretrain the classifier's backbone on the pipeline's own synthetic images.

ImageNet weights cannot be downloaded offline, and a MobileNet trained from scratch on a few
hundred labelled micrographs stays near chance. This command simulates as many images as it
is told (every material and class, over wide dose and pixel-size ranges), runs the
pseudo-labeller on each, prepares them exactly as Transform does, trains the whole network
on the images alone (no teacher features: the backbone is what it writes), and writes the
backbone's weights: the file the Trainer's `weights_path` loads before it
fine-tunes the last layers on the labelled set. A JSON file beside the weights records how
they were made.

    python -m modules.pretrain --images 10000 --epochs 15 --output modules/weights/x.h5
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import multiprocessing  # noqa: E402
import time  # noqa: E402
from typing import Dict, Sequence, Tuple  # noqa: E402

import numpy as np  # noqa: E402

from components import contract, materials  # noqa: E402
from components.defects import DEFECT_CLASSES, IMAGE_CLASSES  # noqa: E402
from components.progress import Progress  # noqa: E402
from components.pseudo_labels import lattice  # noqa: E402
from components.synthesis import simulator  # noqa: E402

# The synthetic corpus spans wider conditions than any one labelled set is likely to.
PRETRAIN_DOSE = (1e3, 1e5)
PRETRAIN_PIXEL_SIZE_PM = (14.0, 28.0)


def simulate_maps(item: Tuple[int, str, str, int], seed: int,
                  config: simulator.SimulationConfig) -> Dict[str, np.ndarray]:
    """One planned image -> its maps by channel source name and its mask_pseudo, as
    Transform reads them."""
    index, material, label, _ = item
    image = simulator.simulate_image(material, label, simulator.seed_for(seed, index), config).image
    try:
        labels = lattice.pseudo_labels(image, substitution_sign=materials.substitution_contrast(material))
        deviation_z, mask = labels.z, labels.mask
    except ValueError:  # no lattice found: the pipeline's pseudo-labeller writes zeros too
        deviation_z = np.zeros_like(image)
        mask = np.zeros((len(DEFECT_CLASSES),) + image.shape, contract.MASK_DTYPE)
    return {"image": image, "deviation_z": deviation_z, contract.MASK_PSEUDO: mask}


def _simulate_worker(args):
    return simulate_maps(*args)


def build_corpus(num_images: int, seed: int, config: simulator.SimulationConfig,
                 materials: Sequence[str], channels: Sequence[str], input_size: int,
                 workers: int) -> Tuple[Dict[str, np.ndarray], np.ndarray]:
    """({IMAGE_XF: float16 (N, size, size, 3), TEACHER_XF: float32 (N, TEACHER_SIZE)}: the
    Transform's outputs by its functions, class index into IMAGE_CLASSES (N,))."""
    import tensorflow as tf

    from modules.transform import IMAGE_XF, TEACHER_SIZE, TEACHER_XF, model_input, teacher_vector

    plan = simulator.plan_dataset(num_images, materials, seed)
    to_input = tf.function(lambda maps: model_input(maps, input_size, channels))
    to_teacher = tf.function(teacher_vector)
    inputs = {IMAGE_XF: np.empty((num_images, input_size, input_size, 3), np.float16),
              TEACHER_XF: np.empty((num_images, TEACHER_SIZE), np.float32)}
    simulated = Progress("pretrain corpus", num_images, "images")
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        jobs = ((item, seed, config) for item in plan)
        for n, maps in enumerate(pool.imap(_simulate_worker, jobs, chunksize=8)):
            mask = maps.pop(contract.MASK_PSEUDO)
            inputs[IMAGE_XF][n] = to_input({k: tf.constant(v) for k, v in maps.items()}).numpy()
            inputs[TEACHER_XF][n] = to_teacher(tf.constant(mask)).numpy()
            simulated.advance()
    labels = np.array([IMAGE_CLASSES.index(label) for _, _, label, _ in plan])
    return inputs, labels


def main(argv=None) -> None:
    from modules import classifier, plots
    from modules.progress_callback import EpochProgress
    from modules.transform import DEFAULT_CHANNELS, DEFAULT_INPUT_SIZE, IMAGE_XF

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=10000)
    parser.add_argument("--validation-images", type=int, default=600)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--seed", type=int, default=31415)
    parser.add_argument("--input-size", type=int, default=DEFAULT_INPUT_SIZE)
    parser.add_argument("--channels", nargs=3, default=list(DEFAULT_CHANNELS))
    parser.add_argument("--materials", nargs="+", default=["SrTiO3", "CdTe"])
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--output", required=True, help="backbone weights file (.h5) to write")
    args = parser.parse_args(argv)
    if os.path.exists(args.output):
        raise SystemExit(f"{args.output} exists; move it away or choose another --output")

    import tensorflow as tf
    import tf_keras as keras

    sim = simulator.SimulationConfig(dose=PRETRAIN_DOSE, pixel_size_pm=PRETRAIN_PIXEL_SIZE_PM)
    started = time.time()
    train_x, train_y = build_corpus(args.images, args.seed, sim, args.materials, args.channels,
                                    args.input_size, args.workers)
    val_x, val_y = build_corpus(args.validation_images, args.seed + 1, sim, args.materials,
                                args.channels, args.input_size, args.workers)
    simulated = time.time() - started

    config = classifier.TrainingConfig(input_size=args.input_size, teacher_features=False)
    model = classifier.build_model(len(IMAGE_CLASSES), config)
    steps = args.epochs * int(np.ceil(len(train_y) / config.batch_size))
    model.optimizer.learning_rate = keras.optimizers.schedules.CosineDecay(
        config.learning_rate, decay_steps=steps)
    augment = classifier.orientation_augmenter(
        [IMAGE_CLASSES.index(label) for label in config.augment_labels])
    train = (tf.data.Dataset.from_tensor_slices((train_x[IMAGE_XF], train_y))
             .shuffle(len(train_y), seed=args.seed)
             .map(lambda x, y: augment({IMAGE_XF: tf.cast(x, tf.float32)}, y),
                  num_parallel_calls=tf.data.AUTOTUNE)
             .batch(config.batch_size).prefetch(tf.data.AUTOTUNE))
    validation = ({IMAGE_XF: val_x[IMAGE_XF].astype(np.float32)}, val_y)
    history = model.fit(train, validation_data=validation, epochs=args.epochs, verbose=0,
                        callbacks=[EpochProgress("pretrain")])

    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    classifier.backbone_of(model).save_weights(args.output)
    stem = os.path.splitext(args.output)[0]
    plots.training_curves(history.history, stem + "_training_curves.png",
                          title=f"Synthetic pretraining ({len(IMAGE_CLASSES)} classes)")
    record = {
        "images": args.images, "validation_images": args.validation_images, "seed": args.seed,
        "validation_seed": args.seed + 1, "epochs": args.epochs, "materials": args.materials,
        "classes": list(IMAGE_CLASSES), "channels": args.channels, "input_size": args.input_size,
        "alpha": config.alpha, "simulation": dataclasses.asdict(sim),
        "validation_accuracy": history.history["val_accuracy"][-1],
        "simulation_seconds": round(simulated, 1),
        "training_seconds": round(time.time() - started - simulated, 1),
    }
    with open(stem + ".json", "w") as handle:
        json.dump(record, handle, indent=1)
    print(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
