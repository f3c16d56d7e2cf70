"""Decoding memory is reserved before decoding: page-header bounds (hub.parquet_bounds) on real files.

How it could break: a bound that underestimates some encoding (dictionary expansion, prefix-encoded
strings, pages holding many rows, v2 pages, many row groups), a reservation made only after a chunk was
decoded, a malformed page header the walk misreads while the reader decodes more, or a batch that needs
more than the whole budget decoded anyway. Each case below is a real Parquet file read by the real
reader; reservations are recorded through the same seam the hub's :class:`~hub.fleetdb.DecodeBudget`
uses.
"""

from __future__ import annotations

import io
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hub.fleetdb import DecodeBudget, FleetDB, checked_rows
from hub.lake import Lake
from hub.parquet_bounds import PageError, scan_pages
from hub.store import open_store
from sre_core.errors import InputError
from sre_core.telemetry_schema import TS, table

MiB = 1 << 20
DEV = "dev-bounds"


def _logs(messages: list[str], loggers: list[str] | None = None) -> pa.Table:
    n = len(messages)
    schema = pa.schema(
        [pa.field("seq", pa.int64()), *table("logs").schema, pa.field("device_id", pa.string())],
        metadata={"sre.table": "logs", "sre.device": DEV},
    )
    return pa.table(
        {
            "seq": pa.array(range(1, n + 1), pa.int64()),
            "ts": pa.array([datetime.now(UTC)] * n, TS),
            "level": pa.array(["info"] * n),
            "logger": pa.array(loggers or ["app"] * n),
            "message": pa.array(messages),
            "device_id": pa.array([DEV] * n),
        },
        schema=schema,
    )


def _parquet(rows: pa.Table, **kw: Any) -> bytes:
    buf = io.BytesIO()
    pq.write_table(rows, buf, compression="zstd", **kw)
    return buf.getvalue()


def _bid(payload: bytes) -> str:
    import hashlib

    return hashlib.sha256(payload).hexdigest()[:40]


N = 20_000
SHAPES: dict[str, bytes] = {
    "dictionary (device default)": _parquet(_logs([f"line {i % 3000} " * 4 for i in range(N)])),
    "plain": _parquet(_logs([f"line {i} " * 4 for i in range(N)]), use_dictionary=False),
    "v2 pages": _parquet(_logs([f"line {i} " * 4 for i in range(N)]), data_page_version="2.0"),
    "many row groups": _parquet(_logs([f"line {i}" for i in range(N)]), row_group_size=777),
    "length-prefixed": _parquet(
        _logs([f"line {i} " * 4 for i in range(N)]),
        use_dictionary=["level", "logger", "device_id"],
        column_encoding={"message": "DELTA_LENGTH_BYTE_ARRAY"},
    ),
    "1 MiB values, 32 to a page": _parquet(_logs(["a" * MiB] * 64), use_dictionary=False, row_group_size=32),
    "dictionary expansion": _parquet(_logs(["b" * MiB] * 40)),
}


@pytest.mark.parametrize("shape", list(SHAPES))
def test_every_step_is_reserved_before_it_is_decoded_and_stays_within_it(shape: str) -> None:
    payload = SHAPES[shape]
    reservations: list[tuple[int, int]] = []  # (bytes, Arrow bytes allocated when reserving)

    def reserve(n: int) -> None:
        reservations.append((n, pa.total_allocated_bytes()))

    start = pa.total_allocated_bytes()
    _, _, steps = checked_rows(DEV, _bid(payload), payload, reserve)
    rows = 0
    for rb in steps:
        held, _ = reservations[-1]
        assert rb.nbytes <= held, (shape, rb.nbytes, held)
        assert pa.total_allocated_bytes() - start <= held + MiB, shape  # all Arrow holds, not just the rows
        rows += rb.num_rows
        del rb
    assert rows == pq.ParquetFile(io.BytesIO(payload)).metadata.num_rows
    held, at = reservations[-1]
    assert at - start < MiB, f"{shape}: reserved only after {at - start} bytes were decoded"


def test_the_bound_is_tight_enough_for_ordinary_batches() -> None:
    payload = SHAPES["dictionary (device default)"]
    pf = pq.ParquetFile(io.BytesIO(payload))
    (step,) = scan_pages(payload, pf.metadata, pf.schema_arrow).chunks(8 * MiB, 8192)
    assert step.rows >= 1024, step  # a device's batch decodes in big steps, not row by row


def test_dictionary_expansion_beyond_the_cap_is_refused_within_the_budget() -> None:
    """One 1 MiB dictionary value repeated for 300 rows: 300 MiB once decoded from a few KiB."""
    payload = _parquet(_logs(["c" * MiB] * 300))
    assert len(payload) < 64 * 1024
    taken: list[int] = []
    _, _, steps = checked_rows(DEV, _bid(payload), payload, taken.append)
    with pytest.raises(InputError, match="once decoded"):
        for rb in steps:
            assert rb.nbytes <= taken[-1]
    assert max(taken) < 32 * MiB


def test_prefix_encoded_strings_are_refused_before_decoding() -> None:
    """DELTA_BYTE_ARRAY: 2,000 values of 4 KiB from a page of a few KiB; no page size bounds them."""
    payload = _parquet(
        _logs(["p" * 4096 + str(i % 7) for i in range(2000)]),
        use_dictionary=["level", "logger", "device_id"],
        column_encoding={"message": "DELTA_BYTE_ARRAY"},
    )
    with pytest.raises(InputError, match="DELTA_LENGTH_BYTE_ARRAY"):
        checked_rows(DEV, _bid(payload), payload, lambda n: None)


def _corrupt(payload: bytes, column: str, at: int, byte: int) -> bytes:
    md = pq.ParquetFile(io.BytesIO(payload)).metadata
    cc = next(
        md.row_group(0).column(j)
        for j in range(md.num_columns)
        if md.row_group(0).column(j).path_in_schema == column
    )
    start = cc.dictionary_page_offset if cc.has_dictionary_page else cc.data_page_offset
    return payload[: start + at] + bytes([byte]) + payload[start + at + 1 :]


@pytest.mark.parametrize(
    ("at", "byte"), [(0, 0x1C), (0, 0x00), (1, 0xFF)], ids=["struct-for-type", "empty", "bad-varint"]
)
def test_malformed_page_headers_are_refused(at: int, byte: int) -> None:
    payload = _parquet(_logs([f"m{i}" for i in range(100)]), use_dictionary=False)
    bad = _corrupt(payload, "message", at, byte)
    with pytest.raises(InputError, match="page headers"):
        checked_rows(DEV, _bid(bad), bad)


def test_pages_holding_other_counts_than_the_footer_are_refused() -> None:
    payload = _parquet(_logs([f"m{i}" for i in range(100)]), use_dictionary=False)
    pf = pq.ParquetFile(io.BytesIO(payload))
    plan = scan_pages(payload, pf.metadata, pf.schema_arrow)
    assert plan.bound(0, 1) > 0
    with pytest.raises(PageError):  # the footer of another file: its chunks do not line up with these pages
        other = _parquet(_logs([f"m{i}" for i in range(90)]), use_dictionary=False)
        scan_pages(payload, pq.ParquetFile(io.BytesIO(other)).metadata, pf.schema_arrow)


def test_a_batch_needing_more_than_the_whole_budget_is_refused_not_decoded(tmp_path: Path) -> None:
    payload = SHAPES["1 MiB values, 32 to a page"]
    lake = Lake(str(tmp_path / "lake"))
    db = FleetDB(tmp_path / "fleet", store=open_store(f"sqlite:///{tmp_path / 'hub.db'}"), lake=lake)
    budget = DecodeBudget(total=16 * MiB, timeout_s=1)
    with pytest.raises(InputError, match="budget"):
        db.land_batch(DEV, _bid(payload), payload, budget)
    assert budget.used == 0 and lake.tables() == []
