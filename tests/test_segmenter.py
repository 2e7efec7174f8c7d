import json
import math
import os
import types

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

from components import contract  # noqa: E402
from components.defects import DEFECT_CLASSES  # noqa: E402
from components.segmentation import serving  # noqa: E402
from modules import segmenter  # noqa: E402

C = len(DEFECT_CLASSES)
TINY = dict(tile_size=32, base_filters=4, depth=2, batch_size=4)
DEVIATION = 10.0  # sigmas, in the test images' deviation maps (scaled to 2.0 for the network)


def tiny(**changes):
    return segmenter.SegmenterConfig(**dict(TINY, **changes))


def micrograph(shape=(48, 48), square=(20, 28, 20, 28), channel=1, seed=0, status="ok"):
    """Noise with a bright square where mask_pseudo marks it (in `channel`), and a deviation
    map of +DEVIATION sigmas there, -1 elsewhere; mask_true is all ones, so any trace of it
    in a batch shows."""
    rng = np.random.default_rng(seed)
    image = rng.normal(0.0, 1.0, shape).astype(np.float32)
    pseudo = np.zeros((C,) + shape, np.uint8)
    r0, r1, c0, c1 = square
    pseudo[channel, r0:r1, c0:c1] = 1
    image[r0:r1, c0:c1] += 50.0
    deviation = np.full(shape, -1.0, np.float32)
    deviation[r0:r1, c0:c1] = DEVIATION
    return contract.Micrograph(
        image=image, material="SrTiO3", label="vacancy", pixel_size_pm=20.0, source=f"test-{seed}",
        mask_true=np.ones((C,) + shape, np.uint8), mask_pseudo=pseudo,
        deviation=deviation, deviation_z=deviation, noise_sigma=1.0, pseudo_label_status=status)


def write(path, micrographs):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with tf.io.TFRecordWriter(path, options="GZIP") as writer:
        for one in micrographs:
            writer.write(contract.to_example(one).SerializeToString())
    return path


def batches(pattern, config, training):
    return [(x.numpy(), y.numpy()) for x, y in segmenter.make_dataset(pattern, config, training)]


def test_config_refuses_unknown_options_and_ignores_the_fingerprint():
    config = segmenter.SegmenterConfig.from_custom_config(
        {"tile_size": 64, "code_fingerprint": "abc", "positive_weight": 3})
    assert config.tile_size == 64 and config.positive_weight == 3
    with pytest.raises(ValueError, match="tile_sise.*known:.*tile_size"):
        segmenter.SegmenterConfig.from_custom_config({"tile_sise": 64})
    with pytest.raises(ValueError, match="divisible"):
        segmenter.SegmenterConfig(tile_size=36, depth=3)
    for bad in (dict(tiles_per_image=0), dict(defect_tile_fraction=1.5),
                dict(defect_tile_fraction=-0.1), dict(prior_probability=0.0),
                dict(prior_probability=1.0), dict(seed=-1), dict(seed=1.5),
                dict(test_time_views=2), dict(test_time_views=0), dict(planar_min_width=8),
                dict(planar_min_width=-1), dict(planar_min_width=9.0),
                dict(dead_channel_retries=-1), dict(dead_channel_retries=True)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            segmenter.SegmenterConfig(**bad)


def test_the_network_starts_at_the_prior_not_at_one_half():
    model = segmenter.build_unet(C, tiny(prior_probability=0.02))
    out = model(np.random.default_rng(1).normal(size=(2, 32, 32, 2)).astype(np.float32)).numpy()
    # The last layer's weights are random, so the output scatters around the prior.
    assert 0.005 < np.median(out) < 0.08


@pytest.mark.parametrize("height, width, stride, inputs",
                         [(20, 36, 1, ("image",)), (44, 12, 1, ("image", "deviation_z")),
                          (24, 40, 2, ("deviation_z", "image"))])
def test_unet_takes_any_multiple_of_the_stride_times_two_to_the_depth(height, width, stride, inputs):
    model = segmenter.build_unet(C, tiny(input_stride=stride, inputs=inputs,
                                         contrast_split=["substitution"] if len(inputs) > 1 else []))
    x = np.random.default_rng(1).normal(size=(2, height, width, len(inputs))).astype(np.float32)
    out = model(x).numpy()
    assert out.shape == (2, height, width, C)  # the full resolution, whatever the stride
    assert np.all((out >= 0) & (out <= 1))
    with pytest.raises(ValueError, match="divisible"):
        tiny(input_stride=3)  # 32 is no multiple of 3 x 4


def test_views_average_the_answers_to_the_turned_and_mirrored_input():
    """The reference is written with NumPy's own rot90 / flip, independently of `predict`."""
    config = tiny(input_stride=1)
    model = segmenter.build_unet(C, config)
    x = np.random.default_rng(3).normal(size=(2, 24, 40, 2)).astype(np.float32)

    def answer(view):
        return model(np.ascontiguousarray(view), training=False).numpy()

    def turned_back(k, mirrored):
        view = np.flip(x, axis=2) if mirrored else x
        back = np.rot90(answer(np.rot90(view, k, axes=(1, 2))), -k, axes=(1, 2))
        return np.flip(back, axis=2) if mirrored else back

    single = segmenter.predict(model, tf.constant(x), config.multiple).numpy()
    np.testing.assert_allclose(single, answer(x), atol=1e-6)
    four = segmenter.predict(model, tf.constant(x), config.multiple, views=4).numpy()
    np.testing.assert_allclose(four, np.mean([turned_back(k, False) for k in range(4)], axis=0),
                               atol=1e-5)
    eight = segmenter.predict(model, tf.constant(x), config.multiple, views=8).numpy()
    np.testing.assert_allclose(
        eight, np.mean([turned_back(k, m) for k in range(4) for m in (False, True)], axis=0),
        atol=1e-5)
    # the random network answers every view differently, so the means are not the single answer
    assert np.abs(eight - single).max() > 1e-4 and np.abs(eight - four).max() > 1e-4

    # 8 views make the answer follow the input turned or mirrored; 1 view does not
    def rotated(views):
        return segmenter.predict(model, tf.constant(np.rot90(x, 1, axes=(1, 2)).copy()),
                                 config.multiple, views=views).numpy()

    np.testing.assert_allclose(rotated(8), np.rot90(eight, 1, axes=(1, 2)), atol=1e-5)
    assert np.abs(rotated(1) - np.rot90(single, 1, axes=(1, 2))).max() > 1e-4
    mirrored = segmenter.predict(model, tf.constant(np.flip(x, axis=2).copy()), config.multiple,
                                 views=8).numpy()
    np.testing.assert_allclose(mirrored, np.flip(eight, axis=2), atol=1e-5)


def test_opening_removes_narrow_planar_marks_and_keeps_bands_and_point_defects():
    """A 7-pixel disc and a 21-pixel-wide slanted band in every channel: after an opening
    over 9 pixels the planar channels keep the band and lose the disc; the others keep both."""
    rows, columns = np.mgrid[:96, :96]
    disc = (rows - 20) ** 2 + (columns - 70) ** 2 <= 3 ** 2
    band = np.abs(rows - 0.5 * columns - 50) <= 10.5 * np.hypot(1, 0.5)  # 21 px across
    marks = np.where(disc | band, 0.9, 0.02).astype(np.float32)
    probabilities = np.repeat(marks[np.newaxis, ..., np.newaxis], C, axis=-1)
    opened = segmenter.open_planar(tf.constant(probabilities), 9).numpy()[0]
    inside = band & ~np.isin(rows, [0, 95]) & ~np.isin(columns, [0, 95])
    for index, name in enumerate(DEFECT_CLASSES):
        if name in ("stacking_fault", "twin_boundary"):
            assert opened[disc, index].max() == pytest.approx(0.02)  # the disc is gone
            kept = np.isclose(opened[..., index][inside], 0.9)
            assert np.mean(kept) > 0.95, np.mean(kept)  # the band stays, but for its corners
            assert np.all(opened[..., index] <= marks + 1e-7)  # an opening never adds
        else:
            np.testing.assert_array_equal(opened[..., index], marks)
    for width in (0, 1):
        np.testing.assert_array_equal(segmenter.open_planar(tf.constant(probabilities), width),
                                      probabilities)


def test_opening_is_the_square_minimum_then_maximum_filter_in_the_planar_channels_only():
    """The separable opening equals SciPy's square filters (the frame's outside ignored) on
    random maps, channel by channel."""
    from scipy import ndimage

    maps = np.random.default_rng(0).random((2, 40, 50, C)).astype(np.float32)
    opened = segmenter.open_planar(tf.constant(maps), 9).numpy()
    eroded = ndimage.minimum_filter(maps, size=(1, 9, 9, 1), mode="constant", cval=np.inf)
    expected = ndimage.maximum_filter(eroded, size=(1, 9, 9, 1), mode="constant", cval=-np.inf)
    for index, name in enumerate(DEFECT_CLASSES):
        wanted = expected if name in ("stacking_fault", "twin_boundary") else maps
        np.testing.assert_array_equal(opened[..., index], wanted[..., index], err_msg=name)


def test_contrast_split_needs_the_deviation_map_and_known_classes():
    with pytest.raises(ValueError, match="contrast_split.*needs 'deviation_z'"):
        tiny(inputs=["image"])
    tiny(inputs=["image"], contrast_split=[])  # nothing to split: the image alone will do
    with pytest.raises(ValueError, match="contrast_split must be distinct names"):
        tiny(contrast_split=["substitutions"])


def test_contrast_targets_split_marks_by_the_sign_of_the_deviation_around_them():
    """Substitution marks on a brighter spot stay in the substitution channel, those on a
    dimmer spot move to the extra channel; the mean over the window decides, so a pixel of
    opposite sign inside a bright disc stays with its disc. Other classes pass unchanged."""
    config = tiny()
    assert segmenter.output_channels(C, config) == DEFECT_CLASSES + ("substitution dimmer",)
    deviation = np.zeros((1, 16, 16), np.float32)
    deviation[0, 2:7, 2:7] = 2.0  # a bright column
    deviation[0, 4, 4] = -1.0  # one noisy pixel inside it
    deviation[0, 9:14, 9:14] = -2.0  # a dim column
    masks = np.zeros((1, 16, 16, C), np.uint8)
    masks[0, 3:6, 3:6, 1] = 1
    masks[0, 10:13, 10:13, 1] = 1
    masks[0, 10:13, 10:13, 0] = 1  # a vacancy mark at the dim spot too
    x = np.stack([np.zeros_like(deviation), deviation], axis=-1)
    same_x, targets = segmenter.contrast_targets(tf.constant(x), tf.constant(masks), config)
    targets = targets.numpy()
    np.testing.assert_array_equal(same_x, x)
    assert targets.shape == (1, 16, 16, C + 1)
    np.testing.assert_array_equal(targets[0, 3:6, 3:6, 1], 1)
    np.testing.assert_array_equal(targets[0, 3:6, 3:6, C], 0)
    np.testing.assert_array_equal(targets[0, 10:13, 10:13, C], 1)
    assert targets[..., 1].sum() == 9 and targets[..., C].sum() == 9
    np.testing.assert_array_equal(targets[..., [0, 2, 3, 4, 5]], masks[..., [0, 2, 3, 4, 5]])
    unsplit = segmenter.contrast_targets(tf.constant(x), tf.constant(masks), tiny(contrast_split=[]))
    np.testing.assert_array_equal(unsplit[1], masks)


def test_a_split_class_is_served_as_the_larger_of_its_two_channels():
    network = segmenter.build_unet(C, tiny())
    trained = segmenter.training_model(network, tiny())
    x = np.random.default_rng(2).normal(size=(2, 32, 32, 2)).astype(np.float32)
    channels, served = trained(x).numpy(), network(x).numpy()
    assert channels.shape == (2, 32, 32, C + 1) and served.shape == (2, 32, 32, C)
    np.testing.assert_allclose(served[..., 1], np.maximum(channels[..., 1], channels[..., C]))
    np.testing.assert_allclose(served[..., [0, 2, 3, 4, 5]], channels[..., [0, 2, 3, 4, 5]])
    assert network.count_params() == trained.count_params()  # one set of weights


def test_loss_prefers_the_right_answer_and_is_finite_without_defects():
    loss = segmenter.bce_dice_loss(positive_weight=5.0, dice_weight=1.0)
    mask = np.zeros((2, 16, 16, C), np.float32)
    mask[0, 4:8, 4:8, 2] = 1
    perfect = float(loss(mask, mask))
    empty = float(loss(mask, np.zeros_like(mask)))
    halfway = float(loss(mask, np.full_like(mask, 0.5)))
    assert perfect < empty and perfect < halfway
    assert perfect < 0.01
    nothing = np.zeros_like(mask)
    assert math.isfinite(float(loss(nothing, nothing))) and float(loss(nothing, nothing)) < 0.01
    assert math.isfinite(float(loss(nothing, np.full_like(mask, 0.5))))


def test_dice_is_averaged_over_the_classes_the_batch_marks_only():
    """A class absent from a batch adds no Dice term (its weak predictions would otherwise
    cost up to a whole Dice point each, which drives every output to zero)."""
    dice_only = segmenter.bce_dice_loss(positive_weight=1.0, dice_weight=1.0)
    bce_only = segmenter.bce_dice_loss(positive_weight=1.0, dice_weight=0.0)
    mask = np.zeros((1, 16, 16, C), np.float32)
    mask[0, 4:8, 4:8, 0] = 1
    faint = mask.copy()
    faint[..., 1:] = 0.05  # a faint answer for the five absent classes
    dice = float(dice_only(mask, faint)) - float(bce_only(mask, faint))
    assert dice == pytest.approx(1 - (2 * 16 + 1) / (16 + 16 + 1), abs=1e-4)  # class 0 only


def test_validation_batches_are_the_central_pseudo_mask_never_mask_true(tmp_path):
    shapes = [(48, 64), (32, 32), (24, 24)]  # wider than tall, the tile's size, smaller
    micrographs = [micrograph(shape, square=(12, 20, 12, 20), channel=i, seed=i)
                   for i, shape in enumerate(shapes)]
    pattern = write(str(tmp_path / "Split-eval" / "data.gz"), micrographs)
    [(inputs, masks)] = batches(pattern, tiny(), training=False)
    assert inputs.shape == (3, 32, 32, 2) and masks.shape == (3, 32, 32, C)
    images, deviations = inputs[..., 0], inputs[..., 1]

    for one, image, deviation, mask in zip(micrographs, images, deviations, masks):
        height, width = one.image.shape
        side = min(height, width)
        top, left = (height - side) // 2, (width - side) // 2
        expected = np.zeros((C, 32, 32), np.float32)
        if side >= 32:
            start = (side - 32) // 2
            expected[:] = one.mask_pseudo[:, top + start:top + start + 32, left + start:left + start + 32]
        else:
            start = (32 - side) // 2
            expected[:, start:start + side, start:start + side] = one.mask_pseudo[:, top:top + side,
                                                                                   left:left + side]
        np.testing.assert_array_equal(mask, np.moveaxis(expected, 0, -1))
        # the bright square sits where the mask says, in the image and the deviation map
        # (scaled: DEVIATION sigmas / modules.transform.DEVIATION_SCALE; zero padding outside)
        marked = mask.sum(-1) > 0
        assert np.all(image[marked] > 1.5) and np.all(image[~marked] < 1.5)
        np.testing.assert_allclose(deviation[marked], DEVIATION / 5.0)
        assert np.all(deviation[~marked] <= 0)
    # standardised over the whole image (the 32 x 32 one is its own tile)
    assert abs(images[1].mean()) < 1e-4 and abs(images[1].std() - 1) < 1e-3
    [(image_only, _)] = batches(pattern, tiny(inputs=["image"], contrast_split=[]), training=False)
    np.testing.assert_array_equal(image_only[..., 0], images)


def test_training_tiles_are_augmented_together_and_never_read_mask_true(tmp_path):
    tf.random.set_seed(3)
    # The square (rows and columns 20-27) lies inside every 32-pixel tile of a 48-pixel image.
    micrographs = [micrograph((48, 48), channel=i % C, seed=i) for i in range(4)]
    pattern = write(str(tmp_path / "Split-train" / "data.gz"), micrographs)
    seen_positions = set()
    dataset = segmenter.make_dataset(pattern, tiny(batch_size=3), training=True)
    for _ in range(4):  # epochs: the same dataset cuts other tiles each time
        for images, masks in dataset.as_numpy_iterator():
            assert images.shape[1:] == (32, 32, 2) and masks.shape[1:] == (32, 32, C)
            for image, mask in zip(images, masks):
                assert mask.sum() == 64  # the whole 8 x 8 square, one channel, no mask_true
                channel = np.flatnonzero(mask.sum((0, 1)))
                assert len(channel) == 1
                square = mask[..., channel[0]] > 0
                np.testing.assert_array_equal(image[..., 0] > 1.5, square)
                np.testing.assert_array_equal(image[..., 1] > 1.5, square)  # turned together
                rows, cols = np.nonzero(square)
                seen_positions.add((rows.min(), cols.min()))
    assert len(seen_positions) > 3  # random crops move the square around


def test_several_tiles_per_image_and_tiles_centred_on_defects(tmp_path):
    tf.random.set_seed(4)
    # A 4 x 4 square in one corner of a 96-pixel image: a uniform 32-pixel tile holds it
    # entirely in one crop position of 65 x 65 and partly in some 1300 of 4225.
    micrographs = [micrograph((96, 96), square=(2, 6, 2, 6), channel=0, seed=i) for i in range(5)]
    pattern = write(str(tmp_path / "Split-train" / "data.gz"), micrographs)

    def tiles(**changes):
        return [mask for _, masks in batches(pattern, tiny(batch_size=4, **changes), True)
                for mask in masks]

    uniform = tiles(tiles_per_image=8, defect_tile_fraction=0.0)
    assert len(uniform) == 40  # 8 tiles of each of the 5 images in one epoch
    centred = tiles(tiles_per_image=8, defect_tile_fraction=1.0)
    assert len(centred) == 40
    # every centred tile holds the defect, and the whole of it (jitter <= a quarter tile)
    assert all(mask.sum() == 16 for mask in centred)
    assert np.mean([mask.sum() > 0 for mask in uniform]) < 0.6


def test_examples_without_a_lattice_are_skipped_unless_asked(tmp_path):
    micrographs = [micrograph(seed=0), micrograph(seed=1, status="no_lattice: no peaks")]
    pattern = write(str(tmp_path / "Split-eval" / "data.gz"), micrographs)
    assert sum(len(x) for x, _ in batches([pattern], tiny(), training=False)) == 1
    assert sum(len(x) for x, _ in batches([pattern], tiny(skip_no_lattice=False), training=False)) == 2
    with pytest.raises(FileNotFoundError, match="nowhere"):
        segmenter.make_dataset([str(tmp_path / "nowhere" / "*.gz")], tiny(), training=False)


def training_examples(root):
    """Six training and two validation images in TFRecords under root; the validation ones."""
    train = [micrograph((40, 40), channel=i % C, seed=i, square=(12, 18, 14, 20)) for i in range(6)]
    evaluation = [micrograph((40, 40), channel=1, seed=10 + i, square=(12, 18, 14, 20)) for i in range(2)]
    write(str(root / "examples" / "Split-train" / "data_tfrecord-00000-of-00001.gz"), train)
    write(str(root / "examples" / "Split-eval" / "data_tfrecord-00000-of-00001.gz"), evaluation)
    return evaluation


def fn_args_for(root, run_name="run", **options):
    return types.SimpleNamespace(
        train_files=[str(root / "examples" / "Split-train" / "*.gz")],
        eval_files=[str(root / "examples" / "Split-eval" / "*.gz")],
        serving_model_dir=str(root / f"serving-{run_name}"),
        model_run_dir=str(root / run_name),
        custom_config=dict(TINY, **dict(dict(epochs=1, input_stride=2, tiles_per_image=2,
                                             defect_tile_fraction=0.5, code_fingerprint="test",
                                             dead_channel_retries=0),
                                        **options)),
    )


@pytest.mark.parametrize("inputs", [("image", "deviation_z"), ("image",)])
def test_run_fn_trains_exports_and_serves_every_signature(tmp_path, inputs):
    evaluation = training_examples(tmp_path)
    split = ["substitution"] if "deviation_z" in inputs else []
    fn_args = fn_args_for(tmp_path, inputs=list(inputs), contrast_split=split)
    segmenter.run_fn(fn_args)

    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert len(history["loss"]) == 1 and "val_loss" in history and "val_iou" in history
    assert history["config"][0]["inputs"] == list(inputs)
    assert history["channels"][0] == list(DEFECT_CLASSES) + [f"{name} dimmer" for name in split]
    assert (tmp_path / "run" / "training_curves.png").stat().st_size > 0

    loaded = tf.saved_model.load(fn_args.serving_model_dir)
    serving_images = loaded.signatures["serving_images"]
    as_given = loaded.signatures["serving_standardised"]
    serialized = [contract.to_example(one).SerializeToString() for one in evaluation]
    by_examples = loaded.signatures["serving_default"](examples=tf.constant(serialized))
    assert by_examples[segmenter.PROBABILITIES].shape == (2, 40, 40, C)
    # 38 x 42 is not a multiple of input_stride x 2**depth = 8: padded and cropped back
    odd = np.random.default_rng(5).normal(size=(3, 38, 42)).astype(np.float32)
    by_images = serving_images(**serving.signature_arguments(serving_images, odd, odd))
    probabilities = by_images[segmenter.PROBABILITIES].numpy()
    assert probabilities.shape == (3, 38, 42, C)
    assert np.all((probabilities >= 0) & (probabilities <= 1))
    # the export averages over the configured views (the four rotations by default): a
    # turned image, a turned answer
    assert history["config"][0]["test_time_views"] == 4
    assert history["config"][0]["planar_min_width"] == 9
    square = odd[:, :32, :32]  # the padded sides turn with the image only when none are padded
    upright = serving_images(**serving.signature_arguments(serving_images, square, square))
    turned = serving_images(**serving.signature_arguments(
        serving_images, np.rot90(square, 1, axes=(1, 2)).copy(), np.rot90(square, 1, axes=(1, 2)).copy()))
    np.testing.assert_allclose(turned[segmenter.PROBABILITIES].numpy(),
                               np.rot90(upright[segmenter.PROBABILITIES].numpy(), 1, axes=(1, 2)),
                               atol=1e-5)
    # the signatures agree on the same images
    raw = np.stack([m.image for m in evaluation])
    deviation = np.stack([m.deviation_z for m in evaluation])
    same = serving_images(**serving.signature_arguments(serving_images, raw, deviation))
    np.testing.assert_allclose(same[segmenter.PROBABILITIES].numpy(),
                               by_examples[segmenter.PROBABILITIES].numpy(), atol=1e-5)
    # serving_standardised takes the standardised images as they are: the same answer for
    # images standardised beforehand, another one for raw images (no second standardisation)
    standardised = (raw - raw.mean(axis=(1, 2), keepdims=True)) / raw.std(axis=(1, 2), keepdims=True)
    given = as_given(**serving.signature_arguments(as_given, standardised, deviation))
    np.testing.assert_allclose(given[segmenter.PROBABILITIES], same[segmenter.PROBABILITIES].numpy(),
                               atol=1e-4)
    unscaled = as_given(**serving.signature_arguments(as_given, raw, deviation))
    assert np.abs(unscaled[segmenter.PROBABILITIES].numpy()
                  - same[segmenter.PROBABILITIES].numpy()).max() > 1e-3
    if "deviation_z" in inputs:  # the deviation map is read, and asked for by name
        other = serving_images(**serving.signature_arguments(serving_images, raw, -deviation))
        assert np.abs(other[segmenter.PROBABILITIES].numpy()
                      - same[segmenter.PROBABILITIES].numpy()).max() > 1e-4
        with pytest.raises(ValueError, match="scan.tif: this segmenter reads the pseudo-labeller's "
                                             "deviation_z"):
            serving.signature_arguments(serving_images, raw, None, source="scan.tif")
    else:
        assert set(serving.signature_arguments(serving_images, raw, None)) == {"images"}


def test_the_same_seed_trains_the_same_model_and_another_seed_another(tmp_path):
    evaluation = training_examples(tmp_path)
    examples = tf.constant([contract.to_example(one).SerializeToString() for one in evaluation])

    def train(run_name, seed):
        fn_args = fn_args_for(tmp_path, run_name, seed=seed, epochs=2)
        tf.random.set_seed(12345 + seed)  # whatever came before must not matter
        segmenter.run_fn(fn_args)
        history = json.loads((tmp_path / run_name / "history.json").read_text())
        served = tf.saved_model.load(fn_args.serving_model_dir).signatures["serving_default"]
        return history["loss"], served(examples=examples)[segmenter.PROBABILITIES].numpy()

    loss, probabilities = train("first", seed=7)
    again_loss, again_probabilities = train("again", seed=7)
    assert again_loss == loss
    np.testing.assert_array_equal(again_probabilities, probabilities)
    other_loss, other_probabilities = train("other", seed=8)
    assert other_loss != loss and np.abs(other_probabilities - probabilities).max() > 1e-4


def test_mask_scores_adds_f1_to_the_pseudo_label_quality():
    masks = np.zeros((2, C, 4, 4), np.uint8)
    masks[0, 0, :2, :2] = 1  # vacancy: 4 true pixels
    masks[1, 3, 0, 0] = 1  # dislocation: 1 true pixel, never predicted
    probabilities = np.zeros((2, 4, 4, C), np.float32)
    probabilities[0, :2, :, 0] = 0.9  # vacancy: 8 predicted, 4 of them right
    probabilities[1, 3, 3, 1] = 0.7  # substitution: predicted where there is none
    probabilities[1, 2, 2, 2] = 0.5  # interstitial: at the threshold, not above it
    masks[0, 4, 1, 1] = 1  # stacking fault: one true pixel, one predicted elsewhere
    probabilities[0, 2, 2, 4] = 0.8
    scores = segmenter.mask_scores(probabilities, masks)
    vacancy = scores["vacancy"]
    assert (vacancy["tp"], vacancy["fp"], vacancy["fn"]) == (4, 4, 0)
    assert vacancy["precision"] == 0.5 and vacancy["recall"] == 1.0 and vacancy["iou"] == 0.5
    assert vacancy["f1"] == pytest.approx(2 / 3)
    assert scores["substitution"]["precision"] == 0 and math.isnan(scores["substitution"]["f1"])
    assert scores["dislocation"]["recall"] == 0 and math.isnan(scores["dislocation"]["f1"])
    assert math.isnan(scores["interstitial"]["f1"]) and scores["interstitial"]["fp"] == 0
    assert scores["stacking_fault"]["f1"] == 0.0
    # one image, without the batch axis
    single = segmenter.mask_scores(probabilities[0], masks[0])
    assert single["vacancy"]["f1"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="channels last"):
        segmenter.mask_scores(probabilities, np.moveaxis(masks, 1, -1))


def test_dead_channel_check_names_the_marked_channels_that_mark_nothing(tmp_path):
    config = tiny(contrast_split=[])
    pattern = write(str(tmp_path / "Split-eval" / "data.gz"),
                    [micrograph(channel=1, seed=0), micrograph(channel=3, seed=1)])
    validation = segmenter.make_dataset([pattern], config, training=False)
    network = segmenter.build_unet(C, config)
    logits = network.get_layer("logits")

    def check(bias, stop, after_epoch=2):
        kernel, _ = logits.get_weights()
        logits.set_weights([np.zeros_like(kernel), np.array(bias, np.float32)])
        callback = segmenter.DeadChannelCheck(validation, 2, DEFECT_CLASSES, stop=stop)
        callback.set_model(network)
        network.stop_training = False
        callback.on_epoch_end(after_epoch - 1)
        return callback

    silent = check([-20.0] * C, stop=True)
    assert silent.dead == [DEFECT_CLASSES[1], DEFECT_CLASSES[3]]  # the unmarked channels are not dead
    assert silent.stopped and network.stop_training
    assert check([-20.0] * C, stop=True, after_epoch=1).dead == []  # looks after epoch 2 only
    one_lives = check([-20.0, 20.0] + [-20.0] * (C - 2), stop=False)
    assert one_lives.dead == [DEFECT_CLASSES[3]] and not one_lives.stopped and not network.stop_training
    assert check([20.0] * C, stop=True).dead == []


@pytest.mark.parametrize("prior, retries, seeds", [(1e-6, 1, [3, 4]), (1e-6, 0, [3]), (1 - 1e-6, 1, [3])])
def test_a_dead_channel_starts_training_again_from_the_next_seed(tmp_path, prior, retries, seeds):
    """The validation images mark substitutions only: a network that answers (almost) 0
    everywhere has that channel dead, one that answers (almost) 1 has none."""
    training_examples(tmp_path)
    fn_args = fn_args_for(tmp_path, prior_probability=prior, learning_rate=1e-9, seed=3,
                          dead_channel_retries=retries)
    segmenter.run_fn(fn_args)
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    attempts = history["attempts"][0]
    assert [attempt["seed"] for attempt in attempts] == seeds
    assert all(attempt["epochs"] == 1 for attempt in attempts)
    dead = ["substitution"] if prior < 0.5 else []
    assert all(attempt["dead_channels"] == dead for attempt in attempts)
    assert history["config"][0]["seed"] == seeds[-1]  # the kept model's
    assert segmenter.dead_channel_epoch(segmenter.SegmenterConfig(epochs=25)) == 8
    assert segmenter.dead_channel_epoch(segmenter.SegmenterConfig(epochs=1)) == 1
