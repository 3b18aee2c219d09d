"""The model specs a service serves, read again from their folder when a version is new to it.

A hot deploy adds a version to a spec file (and loads it into Triton) while every service runs.
The router and reporting hold their specs in a ``SpecCatalog``: asked about a model version they
do not know, they read the folder again (at most once a second), so a deployed version is
routed and reported without restarting either. A folder that no longer reads (a spec half
edited) keeps the specs held before, and says why.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import yaml

from medmesh_contracts.modelspec import ModelSpec, load_specs

MIN_RELOAD_INTERVAL_S = 1.0


class SpecCatalog:
    """Specs by model name (``specs``, one dict updated in place so every holder sees a reload)."""

    def __init__(
        self,
        directory: Path,
        clock: Callable[[], float] = time.monotonic,
        min_interval_s: float = MIN_RELOAD_INTERVAL_S,
    ) -> None:
        self.directory = directory
        self.specs: dict[str, ModelSpec] = load_specs(directory)
        self._clock = clock
        self._min_interval_s = min_interval_s
        self._last_read = clock()
        # Why the last reload failed (None: it did not).
        self.last_error: str | None = None

    def knows(self, model: str, version: int) -> bool:
        """The catalog holds the spec of this model version."""
        spec = self.specs.get(model)
        return spec is not None and any(v.version == version for v in spec.versions)

    def learn(self, model: str, version: int) -> bool:
        """True when the version is known, after reading the folder again if it was not (and
        the last read is older than the minimum interval)."""
        if self.knows(model, version):
            return True
        now = self._clock()
        if now - self._last_read < self._min_interval_s:
            return False
        self._last_read = now
        try:
            fresh = load_specs(self.directory)
        except (OSError, ValueError, yaml.YAMLError) as exc:
            self.last_error = f"{type(exc).__name__}: {exc}"
            return False
        self.last_error = None
        self.specs.clear()
        self.specs.update(fresh)
        return self.knows(model, version)
