"""create_pipeline(): the component graph, built from one PipelineConfig."""

from __future__ import annotations

import hashlib
import json
import pathlib
from typing import List, Optional

import tensorflow_model_analysis as tfma
from ml_metadata.proto import metadata_store_pb2
from tfx import v1 as tfx

from components import contract
from components.clustering.component import DefectClusterer
from components.micrographs.component import MicrographExampleGen
from components.micrographs.executor import folder_fingerprint
from components.pseudo_labels.component import PseudoLabeler
from components.schema_gate.component import SchemaGate
from components.segmentation.component import SegmentationEvaluator
from components.synthesis.component import SyntheticStemGen
from modules import classifier, transform
from pipeline.config import PipelineConfig


_COMPONENTS = pathlib.Path(contract.__file__).parent
# The code each custom step runs, beyond its parameters: simulator and its data, module files.
SYNTHESIS_CODE = (_COMPONENTS / "synthesis", _COMPONENTS / "materials.py",
                  _COMPONENTS / "defects.py", _COMPONENTS / "contract.py")
MICROGRAPH_CODE = (_COMPONENTS / "micrographs", _COMPONENTS / "pseudo_labels" / "lattice.py",
                   _COMPONENTS / "synthesis" / "executor.py", _COMPONENTS / "materials.py",
                   _COMPONENTS / "defects.py", _COMPONENTS / "contract.py")
PSEUDO_LABEL_CODE = (_COMPONENTS / "pseudo_labels", _COMPONENTS / "contract.py",
                     _COMPONENTS / "defects.py")
MODULES_CODE = (pathlib.Path(transform.__file__).parent, _COMPONENTS / "contract.py",
                _COMPONENTS / "defects.py")
SEGMENTATION_CODE = (_COMPONENTS / "segmentation", _COMPONENTS / "contract.py",
                     _COMPONENTS / "defects.py")
SCHEMA_GATE_CODE = (_COMPONENTS / "schema_gate",)
CLUSTERING_CODE = (_COMPONENTS / "clustering", _COMPONENTS / "contract.py",
                   _COMPONENTS / "defects.py")
# Which of those each step's parameters fingerprint (pipeline.results compares a run's
# fingerprints with the checkout's).
CODE_OF_STEP = {"SyntheticStemGen": SYNTHESIS_CODE, "MicrographExampleGen": MICROGRAPH_CODE,
                "PseudoLabeler": PSEUDO_LABEL_CODE, "SchemaGate": SCHEMA_GATE_CODE,
                "Transform": MODULES_CODE, "Trainer": MODULES_CODE,
                "SegmenterTrainer": MODULES_CODE, "SegmentationEvaluator": SEGMENTATION_CODE,
                "DefectClusterer": CLUSTERING_CODE}


def code_fingerprint(paths) -> str:
    """Hash of the Python files at `paths` (files or folders): part of a step's cache key.

    TFX's cache sees a component's inputs and parameters, not the code a dotted path names,
    so without this an edited simulator or module file would be served stale results.
    """
    digest = hashlib.sha256()
    for path in paths:
        for source in sorted(path.rglob("*.py")) if path.is_dir() else [path]:
            digest.update(source.read_bytes())
    return digest.hexdigest()[:16]


def synthesis_config_json(config: PipelineConfig) -> str:
    return json.dumps({
        "materials": list(config.materials),
        "labels": list(config.labels) if config.labels is not None else None,
        "split_tenths": list(config.split_tenths),
        "size": config.image_size,
        "pixel_size_pm": list(config.pixel_size_pm),
        "dose": list(config.dose),
        "code_fingerprint": code_fingerprint(SYNTHESIS_CODE),
    }, sort_keys=True)


def micrograph_config_json(config: PipelineConfig) -> str:
    """The folder's config, with the code's and the folder's fingerprints: TFX's cache must
    see new, removed or changed files, which the parameters alone do not show."""
    micrographs = config.micrograph_config()
    return micrographs.to_json(code_fingerprint=code_fingerprint(MICROGRAPH_CODE),
                               folder_fingerprint=folder_fingerprint(micrographs.root))


def pseudo_label_config_json(config: PipelineConfig) -> str:
    return json.dumps(dict(config.pseudo_labels, code_fingerprint=code_fingerprint(PSEUDO_LABEL_CODE)),
                      sort_keys=True)


def schema_gate_config_json(config: PipelineConfig) -> str:
    return json.dumps({"schema": config.schema_file,
                       "tolerated": {feature: list(kinds)
                                     for feature, kinds in config.schema_tolerance.items()},
                       "code_fingerprint": code_fingerprint(SCHEMA_GATE_CODE)}, sort_keys=True)


def segmentation_eval_config_json(config: PipelineConfig) -> str:
    return json.dumps({
        "split": "test",
        "threshold": 0.5,
        "min_iou": config.segmentation_min_iou,
        "heatmap_images": config.heatmap_images,
        "code_fingerprint": code_fingerprint(SEGMENTATION_CODE),
    }, sort_keys=True)


def clustering_config_json(config: PipelineConfig) -> str:
    return json.dumps(dict(config.clustering, code_fingerprint=code_fingerprint(CLUSTERING_CODE)),
                      sort_keys=True)


def classifier_eval_config(config: PipelineConfig) -> tfma.EvalConfig:
    """Accuracy overall and per material; the blessing needs every material's threshold."""
    per_material = [
        tfma.PerSliceMetricThreshold(
            slicing_specs=[tfma.SlicingSpec(feature_values={contract.MATERIAL: material})],
            threshold=tfma.MetricThreshold(
                value_threshold=tfma.GenericValueThreshold(lower_bound={"value": bound})),
        )
        for material, bound in sorted(config.min_accuracy.items()) if material in config.materials
    ]
    # Not worse than the last blessed model (ignored while there is none), overall and per slice.
    not_worse = tfma.MetricThreshold(change_threshold=tfma.GenericChangeThreshold(
        direction=tfma.MetricDirection.HIGHER_IS_BETTER,
        absolute={"value": -config.max_accuracy_drop}))
    return tfma.EvalConfig(
        model_specs=[tfma.ModelSpec(
            signature_name="serving_default",
            preprocessing_function_names=["transform_features"],
            label_key=transform.LABEL_XF,
            prediction_key=classifier.PROBABILITIES,
        )],
        slicing_specs=[tfma.SlicingSpec(), tfma.SlicingSpec(feature_keys=[contract.MATERIAL])],
        metrics_specs=[tfma.MetricsSpec(metrics=[
            tfma.MetricConfig(class_name="SparseCategoricalAccuracy",
                              threshold=not_worse, per_slice_thresholds=per_material),
            tfma.MetricConfig(class_name="ExampleCount"),
            tfma.MetricConfig(class_name="MultiClassConfusionMatrixPlot"),
        ])],
    )


def create_components(config: PipelineConfig) -> List:
    if config.micrographs is None:
        examples_gen = SyntheticStemGen(
            num_images=config.num_images,
            seed=config.seed,
            synthesis_config=synthesis_config_json(config),
        )
    else:  # real files; what cannot be used goes to its `quarantine` report
        examples_gen = MicrographExampleGen(micrograph_config=micrograph_config_json(config))
    pseudo_labeler = PseudoLabeler(
        examples=examples_gen.outputs["examples"],
        pseudo_label_config=pseudo_label_config_json(config),
    )
    # Everything downstream reads the examples with their pseudo-labels and deviation maps.
    examples = pseudo_labeler.outputs["pseudo_labelled_examples"]
    schema_gen = tfx.components.ImportSchemaGen(schema_file=config.schema_file)
    statistics_gen = tfx.components.StatisticsGen(examples=examples,
                                                  schema=schema_gen.outputs["schema"])
    example_validator = tfx.components.ExampleValidator(
        statistics=statistics_gen.outputs["statistics"],
        schema=schema_gen.outputs["schema"],
    )
    # ExampleValidator only records anomalies: this gate fails the run before any training.
    schema_gate = SchemaGate(anomalies=example_validator.outputs["anomalies"],
                             gate_config=schema_gate_config_json(config))
    modules_fingerprint = code_fingerprint(MODULES_CODE)
    transform_component = tfx.components.Transform(
        examples=examples,
        schema=schema_gen.outputs["schema"],
        preprocessing_fn="modules.transform.preprocessing_fn",
        custom_config={"input_size": config.input_size,
                       "input_channels": list(config.input_channels),
                       "teacher_features": config.teacher_features,
                       transform.CODE_FINGERPRINT: modules_fingerprint},
    )
    # The newest model an Evaluator blessed: the baseline a new model must not fall below,
    # and, with warm_start, the model a new training continues from.
    latest_blessed = tfx.dsl.Resolver(
        strategy_class=tfx.dsl.experimental.LatestBlessedModelStrategy,
        model=tfx.dsl.Channel(type=tfx.types.standard_artifacts.Model),
        model_blessing=tfx.dsl.Channel(type=tfx.types.standard_artifacts.ModelBlessing),
    ).with_id("latest_blessed_model")
    trainer = tfx.components.Trainer(
        run_fn="modules.classifier.run_fn",
        examples=transform_component.outputs["transformed_examples"],
        transform_graph=transform_component.outputs["transform_graph"],
        schema=schema_gen.outputs["schema"],
        base_model=latest_blessed.outputs["model"] if config.warm_start else None,
        custom_config=dict(
            epochs=config.epochs,
            batch_size=config.batch_size,
            fine_tune_layers=config.fine_tune_layers,
            learning_rate=config.learning_rate,
            input_size=config.input_size,
            input_channels=list(config.input_channels),
            teacher_features=config.teacher_features,
            weights_path=config.weights_path,
            augment_labels=list(config.augment_labels),
            **{transform.CODE_FINGERPRINT: modules_fingerprint},
        ),
    )
    evaluator = tfx.components.Evaluator(
        examples=examples,
        model=trainer.outputs["model"],
        baseline_model=latest_blessed.outputs["model"],
        example_splits=["test"],
        eval_config=classifier_eval_config(config),
    )
    pusher = tfx.components.Pusher(
        model=trainer.outputs["model"],
        model_blessing=evaluator.outputs["blessing"],
        push_destination=tfx.proto.PushDestination(
            filesystem=tfx.proto.PushDestination.Filesystem(base_directory=config.serving_model_dir)),
    )
    # The U-Net student learns the pseudo-masks from the image alone (no Transform: see
    # modules/segmenter.py), is scored against them and the ground truth, and pushed if good.
    segmenter_trainer = tfx.components.Trainer(
        run_fn="modules.segmenter.run_fn",
        examples=examples,
        custom_config=dict(config.segmenter, **{transform.CODE_FINGERPRINT: modules_fingerprint}),
    ).with_id("SegmenterTrainer")
    segmentation_evaluator = SegmentationEvaluator(
        model=segmenter_trainer.outputs["model"],
        examples=examples,
        evaluation_config=segmentation_eval_config_json(config),
    )
    segmenter_pusher = tfx.components.Pusher(
        model=segmenter_trainer.outputs["model"],
        model_blessing=segmentation_evaluator.outputs["blessing"],
        push_destination=tfx.proto.PushDestination(
            filesystem=tfx.proto.PushDestination.Filesystem(
                base_directory=config.segmenter_serving_dir)),
    ).with_id("SegmenterPusher")
    # The paper's last step: group the images by what the U-Net's maps show, without labels.
    defect_clusterer = DefectClusterer(
        model=segmenter_trainer.outputs["model"],
        examples=examples,
        model_blessing=segmentation_evaluator.outputs["blessing"],
        clustering_config=clustering_config_json(config),
    )
    classifier_steps = [transform_component, latest_blessed, trainer, evaluator, pusher]
    # Nothing learns from data the SchemaGate has not passed.
    segmenter_trainer.add_upstream_node(schema_gate)
    if config.trains_classifier:
        transform_component.add_upstream_node(schema_gate)
    return ([examples_gen, pseudo_labeler, statistics_gen, schema_gen, example_validator, schema_gate]
            # Unlabelled micrographs: no image classes to learn; segmentation and clustering
            # need none.
            + (classifier_steps if config.trains_classifier else [])
            + [segmenter_trainer, segmentation_evaluator, segmenter_pusher, defect_clusterer])


def create_pipeline(config: PipelineConfig,
                    metadata_connection_config: Optional[metadata_store_pb2.ConnectionConfig] = None,
                    enable_cache: bool = True) -> tfx.dsl.Pipeline:
    if metadata_connection_config is None:
        metadata_connection_config = tfx.orchestration.metadata.sqlite_metadata_connection_config(
            config.metadata_path)
    return tfx.dsl.Pipeline(
        pipeline_name=config.pipeline_name,
        pipeline_root=config.pipeline_root,
        components=create_components(config),
        enable_cache=enable_cache,
        metadata_connection_config=metadata_connection_config,
        beam_pipeline_args=list(config.beam_pipeline_args),
    )
