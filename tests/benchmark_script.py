"""Loading a benchmark script in a test as it runs from the command line."""

import importlib.util
import os
import sys

BENCHMARKS = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks"))


def load(name: str):
    """Yield the module of benchmarks/<name>.py; its sibling benchmarks/machine.py is
    importable meanwhile, as when the script is run as a file."""
    sys.path.insert(0, BENCHMARKS)
    try:
        spec = importlib.util.spec_from_file_location(name, os.path.join(BENCHMARKS, f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(BENCHMARKS)
