"""CC12M (Conceptual 12M) -> URL list.

Assumed layout (google-research-datasets/conceptual-12m): one file `cc12m.tsv` (optionally gzipped), one image
per line, `url<TAB>caption`, no header, no quoting (captions may contain quotes; names are replaced by <PERSON>).
Image sizes are unknown until download, so the min-512 subset of the 512-px stages comes from the download
step's size policy, not from here.
"""
from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from pipeline.core import storage
from pipeline.data.sources.urls import utf8_column, write_url_table

OUTPUT = "urls"


@dataclass
class CC12MConfig:
    """Where cc12m.tsv lives (local or s3://), and an optional row limit for small runs."""

    path: str
    limit: int | None = None


def run(cfg: CC12MConfig, out_uri: str) -> dict:
    """Write the URL list (url, caption) for cc12m.tsv to out_uri."""
    if not storage.exists(cfg.path):
        raise FileNotFoundError(f"CC12M tsv {cfg.path!r} does not exist (expected cc12m.tsv: url<TAB>caption)")
    fs, path = storage.filesystem(cfg.path)
    try:
        with fs.open_input_stream(path, compression="detect") as f:
            table = pacsv.read_csv(
                f, read_options=pacsv.ReadOptions(column_names=["url", "caption"]),
                parse_options=pacsv.ParseOptions(delimiter="\t", quote_char=False),
                # Bytes, not strings: one line that is not UTF-8 must not fail the whole file (decoded below).
                convert_options=pacsv.ConvertOptions(column_types={"url": pa.binary(), "caption": pa.binary()}))
    except pa.ArrowInvalid as e:
        raise ValueError(f"{cfg.path!r} is not a url<TAB>caption tsv: {e}") from e
    n = table.num_rows
    urls, bad_url = utf8_column(table["url"])
    captions, bad_caption = utf8_column(table["caption"])
    is_http = pc.fill_null(pc.starts_with(urls, "http"), False)
    table = pa.table({"url": urls, "caption": captions}).filter(pc.and_(is_http, pa.array(~bad_url)))
    dropped = n - table.num_rows - int(bad_url.sum())
    if cfg.limit is not None:
        table = table.slice(0, cfg.limit)
    return write_url_table(table, out_uri, {"source": "cc12m", "lines": n, "dropped_not_http": dropped,
                                            "url_not_utf8_skipped": int(bad_url.sum()),
                                            "caption_not_utf8_replaced": int(bad_caption.sum())})
