from components.synthesis.executor import split_of, split_pattern


def test_pattern_follows_the_ratio_and_every_prefix_of_five_has_all_splits():
    pattern = split_pattern((7, 2, 1))
    assert [pattern.count(s) for s in range(3)] == [7, 2, 1]
    assert set(pattern[:5]) == {0, 1, 2}
    assert [split_pattern((6, 3, 1)).count(s) for s in range(3)] == [6, 3, 1]


def test_split_follows_each_pairs_occurrence():
    pattern = split_pattern((7, 2, 1))
    assert [split_of(n, pattern) for n in range(12)] == list(pattern) + list(pattern[:2])


def read_splits(uri):
    import glob
    import os

    import tensorflow as tf

    splits = {}
    for split_dir in sorted(glob.glob(os.path.join(uri, "Split-*"))):
        files = sorted(glob.glob(os.path.join(split_dir, "*.gz")))
        records = tf.data.TFRecordDataset(files, compression_type="GZIP")
        splits[os.path.basename(split_dir)] = sorted(r.numpy() for r in records)
    return splits


def test_same_seed_gives_the_same_examples_whatever_the_worker_count(tmp_path):
    """One worker in memory and two worker processes write byte-identical examples."""
    from tfx.dsl.components.base.base_beam_executor import BaseBeamExecutor
    from tfx.types import standard_artifacts

    from components.synthesis.executor import Executor
    from pipeline.config import load_config
    from pipeline.graph import synthesis_config_json

    config = load_config("test", output_dir=str(tmp_path)).replace(num_images=24, image_size=64)
    properties = {"num_images": 24, "seed": 7, "synthesis_config": synthesis_config_json(config)}
    outputs = {}
    for name, args in {
        "one": ["--direct_running_mode=in_memory", "--direct_num_workers=1"],
        "two": ["--direct_running_mode=multi_processing", "--direct_num_workers=2"],
    }.items():
        examples = standard_artifacts.Examples()
        examples.uri = str(tmp_path / name)
        Executor(BaseBeamExecutor.Context(beam_pipeline_args=args)).Do(
            {}, {"examples": [examples]}, properties)
        outputs[name] = read_splits(examples.uri)
    assert set(outputs["one"]) == {"Split-train", "Split-eval", "Split-test"}
    assert sum(len(records) for records in outputs["one"].values()) == 24
    assert outputs["one"] == outputs["two"]
