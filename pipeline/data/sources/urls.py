"""Writing a source's URL list: one Parquet file (url, caption, extra columns), atomically, once."""
from __future__ import annotations

import json

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
