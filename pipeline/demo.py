"""`make demo`: run the pipeline through the real TFX CLI, then say where everything is.

The CLI keeps its state in $LOCAL_HOME ($BEAM_HOME with STEM_ENGINE=beam), which this script
points inside the output folder, so a demo never touches ~/tfx. Rerun it any time: the pipeline is updated, not re-created.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

from pipeline import beam_runner, local_runner, reports, run_report  # noqa: E402
from pipeline.config import PipelineConfig, load_config  # noqa: E402


def cli_environment(config: PipelineConfig) -> dict:
    env = dict(os.environ)
    env["STEM_OUTPUT_DIR"] = config.output_dir
    # TensorFlow's C++ start-up chatter and library deprecation warnings bury the summary.
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env.setdefault("PYTHONWARNINGS", "ignore")
    # The CLI calls `pip freeze` and runs the pipeline with the `tfx` executable's Python.
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    return env


# `tfx --engine=...` -> the pipeline file the CLI runs and the variable naming its state folder.
ENGINES = {"local": (local_runner, "LOCAL_HOME", "tfx_home"),
           "beam": (beam_runner, "BEAM_HOME", "tfx_beam_home")}


def run_through_cli(config: PipelineConfig, engine: str = "local") -> None:
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r} (STEM_ENGINE); known: {sorted(ENGINES)}")
    runner, home, folder = ENGINES[engine]
    env = cli_environment(config)
    env[home] = os.path.join(config.output_dir, folder)
    tfx = os.path.join(os.path.dirname(sys.executable), "tfx")
    exists = os.path.isdir(os.path.join(env[home], config.pipeline_name))
    action = "update" if exists else "create"
    pipeline_path = os.path.abspath(runner.__file__)
    for command in (
        [tfx, "pipeline", action, f"--engine={engine}", f"--pipeline_path={pipeline_path}"],
        [tfx, "run", "create", f"--engine={engine}", f"--pipeline_name={config.pipeline_name}"],
    ):
        print("$", " ".join(command), flush=True)
        subprocess.run(command, env=env, check=True)


def summarise(config: PipelineConfig) -> None:
    outputs = reports.run_outputs(reports.open_store(config.metadata_path))
    examples_uri = outputs["PseudoLabeler.pseudo_labelled_examples"].uri
    figures = [reports.write_example_sheet(
        reports.pick_one_per_class(reports.read_split(examples_uri, "train")),
        os.path.join(config.figures_dir, "example_sheet.png"))]

    print("\nDone. Where to look:")
    print(f"  examples      {examples_uri}")
    if "MicrographExampleGen.quarantine" in outputs:
        print(f"  quarantine    {outputs['MicrographExampleGen.quarantine'].uri}")
        for line in reports.quarantine_summary(outputs["MicrographExampleGen.quarantine"].uri):
            print(f"                  {line}")
    print(f"  pseudo-labels {outputs['PseudoLabeler.report'].uri}")
    for line in reports.pseudo_label_summary(outputs["PseudoLabeler.report"].uri):
        print(f"                  {line}")
    print(f"  statistics    {outputs['StatisticsGen.statistics'].uri}")
    print(f"  schema        {outputs['ImportSchemaGen.schema'].uri}")
    print(f"  anomalies     {outputs['ExampleValidator.anomalies'].uri}")
    for line in reports.anomalies_summary(outputs["ExampleValidator.anomalies"].uri):
        print(f"                  {line}")
    print(f"  schema gate   {outputs['SchemaGate.verdict'].uri}")
    for line in reports.schema_gate_summary(outputs["SchemaGate.verdict"].uri):
        print(f"                  {line}")
    pushers = [("segmenter", "SegmenterPusher")]
    if config.trains_classifier:
        curves = os.path.join(config.figures_dir, "classifier_training_curves.png")
        shutil.copyfile(os.path.join(outputs["Trainer.model_run"].uri, "training_curves.png"), curves)
        figures += [curves, reports.write_confusion_matrices(
            reports.confusion_matrices(outputs["Evaluator.evaluation"].uri),
            reports.label_vocabulary(outputs["Transform.transform_graph"].uri),
            os.path.join(config.figures_dir, "classifier_confusion_matrices.png"))]
        print(f"  evaluation    {outputs['Evaluator.evaluation'].uri}")
        for line in reports.accuracy_summary(outputs["Evaluator.evaluation"].uri):
            print(f"                  {line}")
        pushers.insert(0, ("classifier", "Pusher"))
    segmentation = outputs["SegmentationEvaluator.evaluation"].uri
    print(f"  segmentation  {segmentation}")
    for line in reports.segmentation_summary(segmentation):
        print(f"                  {line}")
    clusters = outputs["DefectClusterer.clusters"].uri
    print(f"  clusters      {clusters}")
    for line in reports.clustering_summary(clusters):
        print(f"                  {line}")
    for name, pusher in pushers:
        pushed = outputs[f"{pusher}.pushed_model"].custom_properties
        where = (pushed["pushed_destination"].string_value if pushed["pushed"].int_value
                 else "none: the evaluation gate did not bless this model")
        print(f"  pushed {name:<11}{where}")
    figures += [f"{os.path.join(segmentation, 'heatmaps')} (heat maps of test images)",
                f"{clusters}/{{silhouette,tsne,gallery}}.png"]
    print(f"  figures       {figures[0]}")
    for figure in figures[1:]:
        print(f"                {figure}")
    print(f"  metadata      {config.metadata_path}")
    runs = len(reports.pipeline_runs(reports.open_store(config.metadata_path)))
    page = run_report.write_report(
        config.metadata_path, os.path.join(config.output_dir, "reports", f"run-{runs - 1}.html"))
    print(f"  report        {page} (open it in a browser)")


def main() -> None:
    config = load_config()
    run_through_cli(config, os.environ.get("STEM_ENGINE", "local"))
    summarise(config)


if __name__ == "__main__":
    main()
