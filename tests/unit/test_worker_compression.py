"""lz4 record batches at medmesh's level (issue 17): round trip through aiokafka's own builders
and readers, and the level the producers' builders use. The speed is a ratio in the benchmark
(``python -m medmesh_cli.bench.worker``), never asserted here."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cramjam
import pytest
from aiokafka import codec
from aiokafka.record import default_records
from aiokafka.record.default_records import DefaultRecordBatch, DefaultRecordBatchBuilder

from medmesh_cli.bench.batching import bench_model_task
from medmesh_contracts.events import to_wire
from medmesh_contracts.modelspec import load_specs
from medmesh_runtime.kafka import (
    LZ4_LEVEL,
    compression_type,
    lz4_encoder,
    lz4_level,
    set_lz4_level,
)
from medmesh_runtime.settings import ServiceSettings

SPECS = Path(__file__).resolve().parents[2] / "deploy" / "models"
MAGIC_V2, CODEC_LZ4 = 2, DefaultRecordBatch.CODEC_LZ4


@pytest.fixture(scope="module")
def ecg_task() -> bytes:
    """A RunInference with the ECG screen's synthetic lead (about 19 kB of JSON)."""
    return to_wire(bench_model_task(load_specs(SPECS)["ecg-rhythm"], 1, "compression"))


@pytest.fixture(autouse=True)
def medmesh_level() -> Iterator[None]:
    """Every test starts and ends with the level medmesh's producers use."""
    set_lz4_level(LZ4_LEVEL)
    yield
    set_lz4_level(LZ4_LEVEL)


def _batch(builder_class: Any, value: bytes) -> bytes:
    builder = builder_class(MAGIC_V2, CODEC_LZ4, 0, -1, -1, -1, 1 << 20)
    builder.append(0, timestamp=None, key=b"pseudo-1", value=value, headers=[("h", b"v")])
    return bytes(builder.build())


def _lz4_frame(payload: bytes, level: int) -> bytes:
    compressor = cramjam.lz4.Compressor(level=level, content_checksum=False, block_linked=False)
    compressor.compress(payload)
    return bytes(compressor.finish())


def test_producers_choose_lz4_and_its_encoder_is_set_to_medmesh_level() -> None:
    """The configured lz4 is kept on the wire; after aiokafka's level 9 it is level 1 again."""
    set_lz4_level(9)
    assert lz4_level() == 9
    assert compression_type(ServiceSettings(kafka_compression="lz4")) == "lz4"
    assert lz4_level() == LZ4_LEVEL == 1
    assert lz4_level("aiokafka.record.default_records") == LZ4_LEVEL


def test_lz4_level_encoder_is_aiokafka_framing_at_that_level(ecg_task: bytes) -> None:
    """The encoder gives cramjam's independent-block frame at the chosen level, which aiokafka's
    decoder reads; level 9 gives another (smaller) frame."""
    fast, hc = lz4_encoder(1)(ecg_task), lz4_encoder(9)(ecg_task)
    assert fast == _lz4_frame(ecg_task, 1)
    assert hc == codec.lz4_encode(ecg_task)
    assert len(hc) < len(fast) < len(ecg_task)
    assert codec.lz4_decode(fast) == ecg_task


@pytest.mark.parametrize(
    "builder_class",
    [DefaultRecordBatchBuilder, default_records._DefaultRecordBatchBuilderPy],
    ids=["producer-builder", "pure-python-builder"],
)
def test_a_record_batch_round_trips_compressed_at_medmesh_level(
    builder_class: Any, ecg_task: bytes
) -> None:
    """A batch built by aiokafka's builder is lz4-compressed at level 1 (its size is level 1's,
    not level 9's) and reads back to the same record."""
    set_lz4_level(9)
    at_nine = _batch(builder_class, ecg_task)
    set_lz4_level(LZ4_LEVEL)
    at_one = _batch(builder_class, ecg_task)
    assert len(at_nine) < len(at_one) < len(ecg_task)
    batch = DefaultRecordBatch(at_one)
    assert batch.compression_type == CODEC_LZ4
    [record] = list(batch)
    assert (record.key, record.value) == (b"pseudo-1", ecg_task)
    assert record.headers == [("h", b"v")]
