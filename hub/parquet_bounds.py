"""Decode bounds of a Parquet file, read from its page headers before anything is decompressed.

A Parquet footer's sizes are written by the sender and prove nothing. The page headers do bind the
reader: Arrow decompresses each page into a buffer of the header's ``uncompressed_page_size`` and
refuses a page that decompresses to another size, and no value spans two pages. So, per column chunk,
the largest page bounds every value, and for PLAIN pages the rows of a window lie within the pages it
overlaps. A dictionary page is decompressed (into its header's size, reserved first) to find its
longest value, which bounds every dictionary-encoded value (otherwise the page size does).
:func:`scan_pages` walks the headers of every column chunk (Thrift compact protocol, the few fields
needed, bounded in pages and nesting) and :class:`DecodePlan` turns them into the bytes decoding ``k``
rows of a row group can take at most, and the largest ``k`` under a target, so a caller reserves memory
*before* decoding a chunk instead of counting it after.

A file whose pages do not exactly fill each column chunk, or whose pages hold another number of values
than the footer, is refused (:class:`PageError`): the walk must see every page the reader will decode.
Only flat schemas (one value per row per column, as every registry table is) are planned.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

__all__ = ["MAX_PAGES", "ChunkBound", "DecodePlan", "PageError", "scan_pages"]

MAX_PAGES = 50_000  # page headers walked per file: a flood of tiny pages is refused, not parsed forever
_ROW_OVERHEAD = 16  # per row and column: offsets, validity, levels
_DICT_ENCODINGS = (2, 8)  # PLAIN_DICTIONARY, RLE_DICTIONARY
# byte-array encodings whose values lie within their page: PLAIN, dictionary, DELTA_LENGTH_BYTE_ARRAY.
# DELTA_BYTE_ARRAY is not: a value's prefix may come from the previous page (parquet-mr writes so, and
# Arrow reads it), and Arrow expands a whole page at once, so nothing small bounds it.
_BYTE_ARRAY_ENCODINGS = (0, 2, 6, 8)
_DATA, _DICT, _DATA_V2 = 0, 2, 3  # PageType
_CODECS = {"UNCOMPRESSED": "", "SNAPPY": "snappy", "GZIP": "gzip", "ZSTD": "zstd", "BROTLI": "brotli",
           "LZ4_RAW": "lz4_raw"}  # fmt: skip
_MAX_DICT_VALUES = 1 << 20  # longer dictionaries are bounded by their page size instead of being read


class PageError(ValueError):
    """The page headers are malformed, or do not match the footer."""


class _Compact:
    """The subset of the Thrift compact protocol a ``PageHeader`` needs (ints, structs; the rest skipped)."""

    def __init__(self, buf: memoryview, pos: int, end: int) -> None:
        self.buf, self.pos, self.end = buf, pos, end

    def _byte(self) -> int:
        if self.pos >= self.end:
            raise PageError("page header runs past its column chunk")
        b = int(self.buf[self.pos])
        self.pos += 1
        return b

    def varint(self) -> int:
        out = shift = 0
        while True:
            b = self._byte()
            out |= (b & 0x7F) << shift
            if not b & 0x80:
                return out
            shift += 7
            if shift > 63:
                raise PageError("varint too long")

    def zigzag(self) -> int:
        n = self.varint()
        return (n >> 1) ^ -(n & 1)

    def _skip(self, ftype: int, depth: int) -> None:
        if ftype in (1, 2):  # booleans live in the field header
            return
        if ftype == 3:
            self._byte()
        elif ftype in (4, 5, 6):
            self.varint()
        elif ftype == 7:
            self._advance(8)
        elif ftype == 8:
            self._advance(self.varint())
        elif ftype == 13:
            self._advance(16)
        elif ftype in (9, 10):
            head = self._byte()
            size = head >> 4 if head >> 4 != 15 else self.varint()
            for _ in range(size):
                self._skip(head & 0x0F if head & 0x0F != 1 else 3, depth + 1)  # list booleans are bytes
        elif ftype == 11:
            size = self.varint()
            kv = self._byte() if size else 0
            for _ in range(size):
                self._skip(kv >> 4, depth + 1)
                self._skip(kv & 0x0F, depth + 1)
        elif ftype == 12:
            self.struct(depth + 1)
        else:
            raise PageError(f"unknown Thrift type {ftype}")

    def _advance(self, n: int) -> None:
        if n < 0 or self.pos + n > self.end:
            raise PageError("page header runs past its column chunk")
        self.pos += n

    def struct(self, depth: int = 0) -> dict[int, int | dict[int, object]]:
        """Read one struct: integer fields and nested structs by field id; anything else is skipped."""
        if depth > 8:
            raise PageError("page header nested too deeply")
        out: dict[int, int | dict[int, object]] = {}
        fid = 0
        while True:
            head = self._byte()
            if head == 0:
                return out
            ftype, delta = head & 0x0F, head >> 4
            fid = fid + delta if delta else self.zigzag()
            if ftype in (4, 5, 6):
                out[fid] = self.zigzag()
            elif ftype == 12:
                out[fid] = self.struct(depth + 1)  # type: ignore[assignment]
            else:
                self._skip(ftype, depth)


@dataclass(frozen=True)
class _Column:
    """What bounds the decoding of one column chunk."""

    width: int  # bytes per value of a fixed-width column; 0 for byte arrays
    dict_size: int  # the dictionary page's uncompressed size (0 without one)
    dict_value: int  # the longest dictionary value (its page size when it could not be read)
    max_data: int  # the largest data page, uncompressed
    min_rows: int  # the fewest values in a data page (>= 1)
    dict_encoded: bool  # some data page refers to the dictionary

    def bound(self, k: int) -> int:
        """Bytes decoding ``k`` rows of this chunk can hold at most (pages in flight included)."""
        held = 2 * self.dict_size + self.max_data  # decoded dictionary and one decompressed page
        if self.width:
            return held + k * (self.width + _ROW_OVERHEAD)
        per_value = max(self.dict_value, self.max_data)  # no value spans two pages
        overlapped = (math.ceil(k / self.min_rows) + 1) * self.max_data  # k rows touch these pages only
        values = min(k * per_value, overlapped + (k * self.dict_value if self.dict_encoded else 0))
        return held + values + k * _ROW_OVERHEAD


@dataclass(frozen=True)
class ChunkBound:
    """Rows per chunk for one row group and the bytes one such chunk may take."""

    row_group: int
    rows: int
    bytes: int


class DecodePlan:
    """Per row group, the chunk size to decode and what to reserve for it (see the module docstring)."""

    def __init__(self, row_groups: list[list[_Column]], num_rows: list[int]) -> None:
        self._groups = row_groups
        self._rows = num_rows

    def bound(self, row_group: int, k: int) -> int:
        """Bytes decoding ``k`` rows of ``row_group`` can take at most."""
        return sum(c.bound(k) for c in self._groups[row_group])

    def chunks(self, target: int, max_rows: int) -> list[ChunkBound]:
        """For each row group, the most rows (1..``max_rows``) whose bound stays within ``target``."""
        out = []
        for g, n in enumerate(self._rows):
            lo, hi = 1, max(1, min(max_rows, n))
            while lo < hi:  # the bound grows with k: the largest k that fits
                mid = (lo + hi + 1) // 2
                lo, hi = (mid, hi) if self.bound(g, mid) <= target else (lo, mid - 1)
            out.append(ChunkBound(g, lo, self.bound(g, lo)))
        return out


def _width(t: pa.DataType) -> int:
    if pa.types.is_boolean(t):
        return 1
    try:
        return max(1, int(t.bit_width) // 8)
    except ValueError:
        return 0


def _longest_plain_value(page: memoryview, count: int) -> int | None:
    """The longest of ``count`` PLAIN byte-array values (4-byte length, then bytes); None if malformed."""
    pos = longest = 0
    for _ in range(count):
        if pos + 4 > len(page):
            return None
        (n,) = struct.unpack_from("<I", page, pos)
        pos += 4 + n
        longest = max(longest, n)
    return longest if pos <= len(page) else None


def _dictionary_value(page: memoryview, size: int, count: int, codec: str) -> int:
    """The longest value of a dictionary page (``size`` when it cannot be read: still a bound)."""
    name = _CODECS.get(codec.upper())
    if name is None or count > _MAX_DICT_VALUES:
        return size
    try:
        data = memoryview(pa.decompress(page, decompressed_size=size, codec=name)) if name else page
    except (pa.ArrowException, ValueError):
        return size
    longest = _longest_plain_value(data[:size], count)
    return size if longest is None else min(longest, size)


def scan_pages(
    payload: bytes,
    md: pq.FileMetaData,
    schema: pa.Schema,
    reserve: Callable[[int], None] | None = None,
) -> DecodePlan:
    """Walk every column chunk's page headers in ``payload`` and plan its decoding.

    ``schema`` gives each column's Arrow type by name (fixed width or byte array). ``reserve(n)`` is
    called with a dictionary page's size before it is decompressed.

    Raises:
        PageError: malformed headers, pages that do not fill a column chunk exactly, values that do not
            add up to the footer's, a nested column, a string column in an encoding whose values are not
            bounded by their page (DELTA_BYTE_ARRAY), or more than :data:`MAX_PAGES` pages.
    """
    buf = memoryview(payload)
    pages = 0
    groups: list[list[_Column]] = []
    for g in range(md.num_row_groups):
        rg = md.row_group(g)
        cols = []
        for j in range(rg.num_columns):
            cc = rg.column(j)
            name = cc.path_in_schema
            if "." in name or schema.get_field_index(name) < 0:
                raise PageError(f"column {name[:64]!r} is not a flat column of the table")
            start = int(cc.data_page_offset)
            if cc.has_dictionary_page and cc.dictionary_page_offset:
                start = min(start, int(cc.dictionary_page_offset))
            end = start + int(cc.total_compressed_size)
            if start < 4 or end > len(payload) - 8 or end < start:
                raise PageError("a column chunk lies outside the file")
            width = _width(schema.field(name).type)
            dict_size = dict_value = max_data = values = 0
            min_rows = 1 << 62
            dict_encoded = False
            pos = start
            while pos < end:
                pages += 1
                if pages > MAX_PAGES:
                    raise PageError(f"more than {MAX_PAGES} pages")
                r = _Compact(buf, pos, end)
                h = r.struct()
                ptype, size, csize = h.get(1), h.get(2), h.get(3)
                if not isinstance(ptype, int) or not isinstance(size, int) or not isinstance(csize, int):
                    raise PageError("a page header lacks its type or sizes")
                if size < 0 or csize < 0:
                    raise PageError("a negative page size")
                pos = r.pos + csize
                if pos > end:
                    raise PageError("a page runs past its column chunk")
                if ptype == _DICT:
                    dh = h.get(7)
                    count = dh.get(1) if isinstance(dh, dict) else None
                    if width or not isinstance(count, int) or count < 0 or dict_size:
                        longest = size
                    else:
                        if reserve is not None:
                            reserve(size)
                        longest = _dictionary_value(buf[r.pos : pos], size, count, str(cc.compression))
                    dict_size, dict_value = max(dict_size, size), max(dict_value, longest)
                    continue
                sub = h.get(5 if ptype == _DATA else 8)
                if ptype not in (_DATA, _DATA_V2) or not isinstance(sub, dict):
                    continue  # index pages hold no values
                n, enc = sub.get(1), sub.get(2 if ptype == _DATA else 4)
                if not isinstance(n, int) or n < 0:
                    raise PageError("a data page without its number of values")
                values += n
                max_data = max(max_data, size)
                min_rows = min(min_rows, max(1, n))
                dict_encoded = dict_encoded or enc in _DICT_ENCODINGS
                if not width and enc not in _BYTE_ARRAY_ENCODINGS:
                    raise PageError(
                        f"column {name[:64]!r} has pages in encoding {enc}: string columns must be PLAIN, "
                        "dictionary or DELTA_LENGTH_BYTE_ARRAY encoded"
                    )
            if pos != end:
                raise PageError("the pages do not fill their column chunk")
            if values != cc.num_values or values != rg.num_rows:
                raise PageError(
                    f"column {name[:64]!r} holds {values} values, the footer says {cc.num_values}"
                )
            cols.append(_Column(width, dict_size, dict_value, max_data, min(min_rows, 1 << 30), dict_encoded))
        groups.append(cols)
    return DecodePlan(groups, [md.row_group(g).num_rows for g in range(md.num_row_groups)])
