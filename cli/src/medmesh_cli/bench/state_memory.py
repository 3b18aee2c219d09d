"""Issue 16: the memory one patient's readings state takes in ingest, per model.

    python -m medmesh_cli.bench.state_memory [--patients 500]

Runs ingest's own logic (``IngestService.handle``, no Kafka) over synthetic patients built from
the repository's fixtures: vitals Bundles (tests/fixtures/fhir/vitals-bundle-*.json, varied per
patient as the benchmarks do) for the deterioration model, one ECG lead
(tests/fixtures/fhir/ecg-*.json, 10 s at 500 Hz, kept as 2500 samples at 250 Hz) for
ecg-rhythm. Per model it reports, in bytes per patient, what the store frees when it is dropped
(tracemalloc), in the two forms a state is held: as merged from a payload, and as read back
from medmesh.ingest.readings (a restart's rebuild, or another instance's write); and the
store's own estimate (``state_bytes``, what MEDMESH_READINGS_MAX_BYTES counts), which must not
be below either. tracemalloc counts Python's allocations, not the allocator's slack: the
process's resident memory grows somewhat more.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import tracemalloc
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from medmesh_cli.bench.pipeline import vitals_events
from medmesh_cli.devstack.paths import repo_root
from medmesh_contracts.events import (
    PatientReadingsUpdated,
    Producer,
    SourceContext,
    to_wire,
    utc_now,
)
from medmesh_contracts.modelspec import load_specs
from medmesh_ingest.pseudonym import Pseudonymizer
from medmesh_ingest.readings import ReadingsStore, state_key
from medmesh_ingest.service import Context, IngestService, Outgoing
from medmesh_ingest.validation import Limits

FIXTURES = Path("tests") / "fixtures" / "fhir"
VITALS = ("vitals-bundle-low.json", "vitals-bundle-medium.json", "vitals-bundle-high.json")
ECGS = (("ecg-sinus.json", "example-ecg-sinus"), ("ecg-af.json", "example-ecg-af"))


@dataclass(frozen=True)
class StateMemory:
    """Bytes per patient's state of one model: measured in both forms, and estimated."""

    model: str
    patients: int
    merged: float
    rebuilt: float
    estimated: float
    wire: float

    def row(self) -> str:
        """One Markdown table row."""
        return (
            f"| {self.model} | {self.patients} | {self.merged:,.0f} | {self.rebuilt:,.0f} | "
            f"{self.estimated:,.0f} | {self.wire:,.0f} |"
        )


HEADER = (
    "| model | patients | merged from payloads (B) | read back from the topic (B) | "
    "estimate (B) | on the topic, JSON (B) |\n|---|---|---|---|---|---|"
)


def vitals_payloads(root: Path, patients: int) -> list[bytes]:
    """One vitals Bundle per patient, the three fixtures in turn, values varied."""
    payloads: list[bytes] = []
    for index, name in enumerate(VITALS):
        template = json.loads((root / FIXTURES / name).read_text())
        share = len(range(index, patients, len(VITALS)))
        payloads.extend(vitals_events(template, share, share, seed=index, prefix=f"v{index}"))
    return payloads


def ecg_payloads(root: Path, patients: int) -> list[bytes]:
    """One ECG Bundle per patient: the sinus and AF fixtures in turn, under another patient id."""
    payloads: list[bytes] = []
    templates = [((root / FIXTURES / name).read_bytes(), old) for name, old in ECGS]
    for index in range(patients):
        raw, old = templates[index % len(templates)]
        payloads.append(raw.replace(old.encode(), f"ecg-{index}".encode()))
    return payloads


class _Acknowledged:
    """Publishes nothing, and answers each state with the next offset, as Kafka would (the
    store keeps a note of each written offset)."""

    def __init__(self) -> None:
        self.offset = 0

    async def __call__(
        self, requests: Sequence[Outgoing], states: Sequence[PatientReadingsUpdated], payloads: int
    ) -> list[int | None]:
        first, self.offset = self.offset, self.offset + len(states)
        return list(range(first, self.offset))


def _rebuild(wires: Sequence[bytes]) -> ReadingsStore:
    """A store rebuilt from the records of medmesh.ingest.readings, as the follower does."""
    store = ReadingsStore()
    for offset, wire in enumerate(wires):
        state = PatientReadingsUpdated.model_validate_json(wire)
        store.put(state)
        store.written(state_key(state.patient_pseudonym, state.model), offset)
    return store


async def measure(root: Path, patients: int) -> list[StateMemory]:
    """Bytes per patient's state, per model (deterioration, ecg-rhythm)."""
    specs = load_specs(root / "deploy" / "models")
    context = Context(SourceContext(channel="kafka"))
    results: list[StateMemory] = []
    for model, payloads in (
        ("deterioration", vitals_payloads(root, patients)),
        ("ecg-rhythm", ecg_payloads(root, patients)),
    ):

        def service(store: ReadingsStore) -> IngestService:
            return IngestService(
                specs=specs,
                pseudonymize=Pseudonymizer(b"state-memory-measurement-key"),
                producer=Producer(service="ingest", instance="ingest-state-memory"),
                store=store,
                publish=_Acknowledged(),
                limits=Limits(),
                lookback=timedelta(hours=4),
            )

        warm = ReadingsStore()
        for payload in payloads[:5]:  # unit registry, model classes, caches: not the states'
            await service(warm).handle(payload, context, utc_now())
        del warm
        gc.collect()
        before = tracemalloc.get_traced_memory()[0]
        store = ReadingsStore()
        handler = service(store)
        for payload in payloads:
            await handler.handle(payload, context, utc_now())
        del handler
        states = list(store)
        if len(states) != patients or any(s.model != model for s in states):
            raise RuntimeError(f"expected {patients} {model} states, the store holds {len(states)}")
        estimated = store.bytes
        wires = [to_wire(s) for s in states]
        del states
        gc.collect()
        with_store = tracemalloc.get_traced_memory()[0]
        del store
        gc.collect()
        merged = with_store - tracemalloc.get_traced_memory()[0]
        if merged <= 0 or with_store <= before:
            raise RuntimeError("tracemalloc saw no memory held by the store")
        gc.collect()
        before_rebuild = tracemalloc.get_traced_memory()[0]
        rebuilt = _rebuild(wires)
        gc.collect()
        rebuilt_bytes = tracemalloc.get_traced_memory()[0] - before_rebuild
        estimated = max(estimated, rebuilt.bytes)
        del rebuilt
        results.append(
            StateMemory(
                model=model,
                patients=patients,
                merged=merged / patients,
                rebuilt=rebuilt_bytes / patients,
                estimated=estimated / patients,
                wire=sum(len(w) for w in wires) / patients,
            )
        )
    return results


def main(argv: Sequence[str] | None = None) -> None:
    """Print bytes per patient's state for each model as a Markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--patients", type=int, default=500, help="synthetic patients per model")
    args = parser.parse_args(argv)
    tracemalloc.start()
    results = asyncio.run(measure(repo_root(), args.patients))
    print(HEADER)
    for result in results:
        print(result.row())
    low = [r.model for r in results if r.estimated < max(r.merged, r.rebuilt)]
    if low:
        raise SystemExit(f"the estimate is below the measured memory for {', '.join(low)}")


if __name__ == "__main__":
    main()
