"""Loading a standalone Python file (a Triton model.py, a deploy script) as a module: the model
folders and deploy/ are not packages, yet training scripts, generators and tests import them."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType


def load_file(path: Path, name: str) -> ModuleType:
    """The module in ``path``, loaded under ``name`` (registered in sys.modules before it runs:
    dataclasses look their module up there)."""
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
