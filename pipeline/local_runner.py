"""Entry point for `tfx pipeline create / tfx run create --engine=local`.

The profile and output folder come from $STEM_PROFILE and $STEM_OUTPUT_DIR (defaults: `demo`,
the project's `output/`), so the CLI and the tests build the same graph.
"""

import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

from tfx import v1 as tfx  # noqa: E402

from pipeline.config import load_config  # noqa: E402
from pipeline.graph import create_pipeline  # noqa: E402


def main() -> None:
    tfx.orchestration.LocalDagRunner().run(create_pipeline(load_config()))


if __name__ == "__main__":
    main()
