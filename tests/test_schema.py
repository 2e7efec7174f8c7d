"""The schema's string domains follow the one list of classes and the material registry."""

import os

from tensorflow_metadata.proto.v0 import schema_pb2
from google.protobuf import text_format

from components.defects import IMAGE_CLASSES
from components.materials import MATERIALS
from pipeline.config import SCHEMA_DIR


def load_schema():
    with open(os.path.join(SCHEMA_DIR, "schema.pbtxt")) as handle:
        return text_format.Parse(handle.read(), schema_pb2.Schema())


def test_label_domain_is_bulk_plus_defect_classes():
    domains = {d.name: list(d.value) for d in load_schema().string_domain}
    assert domains["label"] == list(IMAGE_CLASSES)
    assert sorted(domains["material"]) == sorted(MATERIALS)
