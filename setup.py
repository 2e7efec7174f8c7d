"""Installable project: the pipeline, its components and module files."""

from setuptools import find_packages, setup

setup(
    name="stem-defects",
    version="0.1.0",
    description="TFX pipeline that finds, localises and groups defects in HAADF-STEM images",
    python_requires=">=3.11,<3.12",
    packages=find_packages(include=["pipeline*", "components*", "modules*", "kubeflow*"]),
    # Dependencies are pinned in requirements.lock and installed from it (see Makefile):
    # resolving the TFX stack here would backtrack for many minutes.
    install_requires=[],
)
