"""The schema's string domains follow the one list of classes and the material registry."""

import os

from tensorflow_metadata.proto.v0 import schema_pb2
from google.protobuf import text_format

from components.contract import ARRAY_FEATURES
from components.defects import DEFECT_CLASSES, IMAGE_CLASSES, MIXED_LABEL
from components.materials import MATERIALS
from pipeline.config import SCHEMA_DIR


def load_schema():
    with open(os.path.join(SCHEMA_DIR, "schema.pbtxt")) as handle:
        return text_format.Parse(handle.read(), schema_pb2.Schema())


def test_label_domain_is_the_image_classes_plus_mixed():
    domains = {d.name: list(d.value) for d in load_schema().string_domain}
    assert domains["label"] == list(IMAGE_CLASSES + (MIXED_LABEL,))
    assert sorted(domains["material"]) == sorted(MATERIALS)


def test_defect_classes_has_one_entry_per_class():
    (feature,) = [f for f in load_schema().feature if f.name == "defect_classes"]
    assert feature.value_count.min == feature.value_count.max == len(DEFECT_CLASSES)


def test_serialized_arrays_and_only_they_have_an_image_domain():
    """TFDV counts an image_domain feature's bytes; any other bytes feature it sketches by
    value, which for arrays of megabytes held a whole split in memory."""
    with_domain = {f.name for f in load_schema().feature if f.HasField("image_domain")}
    assert with_domain == set(ARRAY_FEATURES)
