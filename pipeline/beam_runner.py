"""Entry point for `tfx pipeline create / tfx run create --engine=beam`.

The same graph as local_runner.py, orchestrated by Beam (BeamDagRunner): each component runs
as a Beam step, and the data-parallel components use the Beam runner named by the config's
`beam_pipeline_args` (default: the multi-processing DirectRunner on every core).
"""

import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

from tfx.orchestration.beam.beam_dag_runner import BeamDagRunner  # noqa: E402

from pipeline.config import load_config  # noqa: E402
from pipeline.graph import create_pipeline  # noqa: E402


def main() -> None:
    BeamDagRunner().run(create_pipeline(load_config()))


if __name__ == "__main__":
    main()
