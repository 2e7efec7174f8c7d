"""The cache keys of the custom steps follow their code."""

import shutil

from pipeline import graph


def test_fingerprint_changes_with_the_code_it_covers_and_only_that(tmp_path):
    covered = tmp_path / "synthesis"
    shutil.copytree(graph.SYNTHESIS_CODE[0], covered, ignore=shutil.ignore_patterns("__pycache__"))
    unrelated = tmp_path / "elsewhere.py"
    unrelated.write_text("x = 1\n")
    before = graph.code_fingerprint([covered])
    unrelated.write_text("x = 2\n")
    assert graph.code_fingerprint([covered]) == before
    (covered / "simulator.py").write_text((covered / "simulator.py").read_text() + "\n# edited\n")
    assert graph.code_fingerprint([covered]) != before


def test_pipeline_parameters_carry_the_fingerprints():
    from pipeline.config import load_config

    components = {c.id: c for c in graph.create_components(load_config("test"))}
    assert graph.code_fingerprint(graph.SYNTHESIS_CODE) in \
        components["SyntheticStemGen"].exec_properties["synthesis_config"]
    assert graph.code_fingerprint(graph.PSEUDO_LABEL_CODE) in \
        components["PseudoLabeler"].exec_properties["pseudo_label_config"]
    assert graph.code_fingerprint(graph.CLUSTERING_CODE) in \
        components["DefectClusterer"].exec_properties["clustering_config"]
    assert graph.code_fingerprint(graph.SCHEMA_GATE_CODE) in \
        components["SchemaGate"].exec_properties["gate_config"]
    trainer_config = components["Trainer"].exec_properties["custom_config"]
    assert graph.code_fingerprint(graph.MODULES_CODE) in str(trainer_config)
