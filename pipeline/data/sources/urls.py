"""Writing a source's URL list: one Parquet file (url, caption, extra columns), atomically, once."""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.core import storage

_META_KEY = b"microdit_report"


def write_url_table(table: pa.Table, out_uri: str, report: dict) -> dict:
    """Write table to out_uri (atomic) with its report in the file metadata; an existing file is kept as is."""
    if storage.exists(out_uri):
        return read_report(out_uri) | {"skipped": True}
    if table.num_rows == 0:
        raise ValueError(f"no rows to write to {out_uri!r} ({report})")
    for col in ("url", "caption"):
        if col not in table.column_names:
            raise ValueError(f"URL table for {out_uri!r} lacks column {col!r}; has {table.column_names}")
    report = {**report, "rows": table.num_rows, "out_uri": out_uri}
    meta = dict(table.schema.metadata or {}) | {_META_KEY: json.dumps(report, sort_keys=True).encode()}
    storage.write_parquet(out_uri, table.replace_schema_metadata(meta))
    return report


def read_report(uri: str) -> dict:
    """The report stored in a URL list's metadata (rows only, for lists written elsewhere)."""
    fs, path = storage.filesystem(uri)
    md = pq.read_metadata(path, filesystem=fs)
    stored = (md.schema.to_arrow_schema().metadata or {}).get(_META_KEY)
    return json.loads(stored) if stored else {"rows": md.num_rows, "out_uri": uri}


def is_text(t: pa.DataType) -> bool:
    """String or binary (a CSV reader infers binary for a column holding bytes that are not UTF-8)."""
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_binary(t) or pa.types.is_large_binary(t)


def utf8_column(col: pa.ChunkedArray) -> tuple[pa.ChunkedArray, np.ndarray]:
    """A column as UTF-8 strings, and a (N,) bool mask of rows whose bytes were not UTF-8 (replaced by U+FFFD)."""
    n = len(col)
    if not is_text(col.type):
        return col.cast(pa.string()), np.zeros(n, bool)  # numbers and the like: their text form
    raw = col.cast(pa.large_binary())  # string -> binary is a view; binary -> string validates
    try:
        return raw.cast(pa.string()), np.zeros(n, bool)
    except pa.ArrowInvalid:  # "Invalid UTF8 payload": find the rows in Python (only lists that have them pay)
        pass
    values, bad = [], np.zeros(n, bool)
    for i, v in enumerate(raw.to_pylist()):
        try:
            values.append(None if v is None else v.decode("utf-8"))
        except UnicodeDecodeError:
            values.append(v.decode("utf-8", errors="replace"))
            bad[i] = True
    return pa.chunked_array([pa.array(values, pa.string())]), bad
