"""One self-contained HTML page per run: data checks, models, gates, figures.

    python -m pipeline.run_report [--run -1] [--output output/reports/run-<n>.html]

Everything is read back from ML Metadata and the run's artifacts, and every figure is
embedded (PNG as a data URI), so the file can be mailed or archived alone and opened in any
browser without the output folder or a network. A section whose step did not run (or whose
output is missing) says so instead of failing the whole report.
"""

from __future__ import annotations

import argparse
import base64
import glob
import html
import os
import tempfile
from typing import Callable, Sequence

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

from pipeline import lineage, reports  # noqa: E402
from pipeline.config import load_config  # noqa: E402

STYLE = """
body { font-family: sans-serif; max-width: 1100px; margin: 2em auto; color: #222; }
h1 { font-size: 1.5em; } h2 { border-bottom: 1px solid #ccc; padding-top: 0.6em; }
table { border-collapse: collapse; margin: 0.5em 0; font-size: 0.9em; }
td, th { border: 1px solid #ddd; padding: 2px 8px; text-align: right; }
th:first-child, td:first-child { text-align: left; }
img { max-width: 100%; margin: 0.4em 0; border: 1px solid #eee; }
.failed { color: #b00; font-weight: bold; } .missing { color: #888; font-style: italic; }
code { font-size: 0.85em; }
"""


def _image(path: str, caption: str = "") -> str:
    with open(path, "rb") as handle:
        data = base64.b64encode(handle.read()).decode()
    title = html.escape(caption or os.path.basename(path))
    return f'<figure><img alt="{title}" src="data:image/png;base64,{data}"><figcaption>{title}</figcaption></figure>'


def _lines(lines: Sequence[str]) -> str:
    items = "".join(f'<li{" class=failed" if "FAILED" in line else ""}>{html.escape(line)}</li>'
                    for line in lines)
    return f"<ul>{items}</ul>"


def statistics_table(statistics_uri: str, split: str = "train") -> str:
    """Per feature of one split: count, missing, and mean/std/min/max or the top values."""
    import tensorflow_data_validation as tfdv

    path = os.path.join(statistics_uri, f"Split-{split}", "FeatureStats.pb")
    dataset = tfdv.load_stats_binary(path).datasets[0]
    rows = []
    for feature in sorted(dataset.features, key=lambda f: f.path.step[0]):
        name = html.escape(".".join(feature.path.step))
        if feature.HasField("num_stats"):
            stats = feature.num_stats
            common = stats.common_stats
            detail = (f"mean {stats.mean:.4g}, std {stats.std_dev:.4g}, "
                      f"min {stats.min:.4g}, max {stats.max:.4g}")
        elif feature.HasField("string_stats"):
            stats = feature.string_stats
            common = stats.common_stats
            top = ", ".join(f"{html.escape(v.value)} ({v.frequency:.0f})" for v in stats.top_values[:6])
            detail = f"{stats.unique} unique: {top}"
        elif feature.HasField("bytes_stats"):  # the schema's serialized arrays
            stats = feature.bytes_stats
            common = stats.common_stats
            detail = (f"serialized arrays, {stats.avg_num_bytes / 1024:.0f} KiB on average "
                      f"({stats.min_num_bytes / 1024:.0f} to {stats.max_num_bytes / 1024:.0f})")
        else:
            continue
        rows.append(f"<tr><td>{name}</td><td>{common.num_non_missing}</td>"
                    f"<td>{common.num_missing}</td><td style='text-align:left'>{detail}</td></tr>")
    return (f"<p>{dataset.num_examples} {html.escape(split)} examples</p><table>"
            "<tr><th>feature</th><th>present</th><th>missing</th><th>values</th></tr>"
            + "".join(rows) + "</table>")


def _section(title: str, build: Callable[[], str]) -> str:
    try:
        body = build()
    except (KeyError, FileNotFoundError, OSError, LookupError) as error:
        body = f'<p class="missing">not available in this run: {html.escape(str(error))}</p>'
    return f"<h2>{html.escape(title)}</h2>\n{body}\n"


def build_report(metadata_path: str, run_index: int = -1) -> str:
    """The HTML page of one run (default: the newest)."""
    store = reports.open_store(metadata_path)
    runs = reports.pipeline_runs(store)
    run = runs[run_index]
    outputs = reports.run_outputs(store, run_index)
    table = lineage.run_table(store)
    index = run_index % len(runs)

    def uri(key: str) -> str:
        return outputs[key].uri

    def data():
        examples = uri("SyntheticStemGen.examples") if "SyntheticStemGen.examples" in outputs \
            else uri("PseudoLabeler.pseudo_labelled_examples")
        with tempfile.TemporaryDirectory() as scratch:
            sheet = reports.write_example_sheet(
                reports.pick_one_per_class(reports.read_split(examples, "train")),
                os.path.join(scratch, "example_sheet.png"))
            picture = _image(sheet, "one training image per material and class, with its ground truth")
        quarantine = ("<h3>Files set aside (quarantine)</h3>"
                      + _lines(reports.quarantine_summary(uri("MicrographExampleGen.quarantine")))
                      if "MicrographExampleGen.quarantine" in outputs else "")
        return (quarantine + "<h3>Anomalies against the schema</h3>"
                + _lines(reports.anomalies_summary(uri("ExampleValidator.anomalies")))
                + "<h3>Schema gate</h3>" + _lines(reports.schema_gate_summary(uri("SchemaGate.verdict")))
                + "<h3>Pseudo-labels</h3>" + _lines(reports.pseudo_label_summary(uri("PseudoLabeler.report")))
                + "<h3>Statistics (TFDV)</h3>" + statistics_table(uri("StatisticsGen.statistics"))
                + "<h3>Examples</h3>" + picture)

    def classifier():
        evaluation = uri("Evaluator.evaluation")
        with tempfile.TemporaryDirectory() as scratch:
            confusion = reports.write_confusion_matrices(
                reports.confusion_matrices(evaluation),
                reports.label_vocabulary(uri("Transform.transform_graph")),
                os.path.join(scratch, "confusion.png"))
            matrices = _image(confusion, "confusion matrix per material (test split)")
        pushed = outputs["Pusher.pushed_model"].custom_properties
        shipped = (f"pushed to <code>{html.escape(pushed['pushed_destination'].string_value)}</code>"
                   if pushed["pushed"].int_value else '<span class="failed">not pushed</span>')
        return (_lines(reports.accuracy_summary(evaluation)) + f"<p>Model {shipped}</p>"
                + _image(os.path.join(uri("Trainer.model_run"), "training_curves.png"),
                         "training and validation loss and accuracy per epoch")
                + matrices)

    def segmenter():
        evaluation = uri("SegmentationEvaluator.evaluation")
        pushed = outputs["SegmenterPusher.pushed_model"].custom_properties
        shipped = (f"pushed to <code>{html.escape(pushed['pushed_destination'].string_value)}</code>"
                   if pushed["pushed"].int_value else '<span class="failed">not pushed</span>')
        figures = [_image(path) for path in sorted(glob.glob(os.path.join(evaluation, "heatmaps", "*.png")))]
        return (_lines(reports.segmentation_summary(evaluation)) + f"<p>U-Net {shipped}</p>"
                + _image(os.path.join(uri("SegmenterTrainer.model_run"), "training_curves.png"),
                         "U-Net training curves") + "".join(figures))

    def clusters():
        where = uri("DefectClusterer.clusters")
        return (_lines(reports.clustering_summary(where))
                + "".join(_image(os.path.join(where, name), caption) for name, caption in (
                    ("silhouette.png", "silhouette per k"),
                    ("tsne.png", "t-SNE of the descriptors"),
                    ("gallery.png", "images nearest each cluster centre"))))

    title = f"stem-defects run {index}: {run.name}"
    body = (f"<h1>{html.escape(title)}</h1><p><code>{html.escape(table[index])}</code></p>"
            + _section("Data: examples, pseudo-labels, statistics, anomalies", data)
            + _section("Classifier (MobileNetV2): evaluation and gate", classifier)
            + _section("Segmenter (U-Net): student vs teacher, heat maps", segmenter)
            + _section("Defect clusters", clusters)
            + "<h2>All runs</h2>" + _lines(table))
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body>{body}</body></html>")


def write_report(metadata_path: str, path: str, run_index: int = -1) -> str:
    page = build_report(metadata_path, run_index)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as handle:
        handle.write(page)
    return path


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", help="config profile (default: $STEM_PROFILE or demo)")
    parser.add_argument("--run", type=int, default=-1, help="run index (0 = first, -1 = newest)")
    parser.add_argument("--output", help="HTML file (default: output/reports/run-<index>.html)")
    args = parser.parse_args(argv)
    config = load_config(args.profile)
    runs = len(reports.pipeline_runs(reports.open_store(config.metadata_path)))
    path = args.output or os.path.join(config.output_dir, "reports", f"run-{args.run % runs}.html")
    print(write_report(config.metadata_path, path, args.run))


if __name__ == "__main__":
    main()
