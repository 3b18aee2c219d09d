"""Loading a standalone file (a Triton model.py, a deploy script) as a module under test: the
CLI's loader, named here for the tests."""

from __future__ import annotations

from medmesh_cli.pyfiles import load_file

__all__ = ["load_file"]
