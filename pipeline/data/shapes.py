"""Synthetic captioned dataset (coloured shapes on plain backgrounds) and a loopback HTTP server for it.

Every picture is a pure function of its `ShapeSpec`, and the caption names every attribute, so a model trained on
it can be checked by rendering the caption's spec. Shapes are placed inside the central square of each image, so
the precompute step's center crop keeps the caption true for any aspect ratio.
"""
from __future__ import annotations

import http.server
import io
import itertools
import json
import os
import random
import re
import threading
import urllib.parse
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from PIL import Image, ImageDraw

from pipeline.core import storage
from pipeline.core.images import to_signed

COLOURS = {  # saturated and far apart, so a sample's dominant colour names its caption
    "red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 70, 220),
    "yellow": (245, 210, 30), "purple": (140, 50, 180), "orange": (245, 130, 20),
}
BACKGROUNDS = {"white": (255, 255, 255), "black": (0, 0, 0), "gray": (128, 128, 128)}
SHAPES = ("circle", "square", "triangle")
# Centre of the shape as a fraction of the central square.
POSITIONS = {"top left": (0.27, 0.27), "top right": (0.73, 0.27), "bottom left": (0.27, 0.73),
             "bottom right": (0.73, 0.73), "center": (0.5, 0.5)}
SIZES = {"small": 0.11, "large": 0.2}  # radius as a fraction of the central square's side
BAD_KINDS = ("corrupt", "not_an_image", "tiny", "missing", "cmyk", "palette")
EXPECTED_OK = {"ok": True, "cmyk": True, "palette": True, "opt_out": False,
               "corrupt": False, "not_an_image": False, "tiny": False, "missing": False}
MANIFEST = "manifest.json"
_CAPTION = re.compile(r"^a (\w+) (\w+) (\w+) on a (\w+) background, ([\w ]+)$")


@dataclass(frozen=True)
class ShapeSpec:
    """One picture: a shape of a colour and size at a position on a plain background."""

    colour: str
    shape: str
    background: str = "white"
    position: str = "center"
    size: str = "large"

    def __post_init__(self):
        for name, value, allowed in (("colour", self.colour, COLOURS), ("shape", self.shape, SHAPES),
                                     ("background", self.background, BACKGROUNDS),
                                     ("position", self.position, POSITIONS), ("size", self.size, SIZES)):
            if value not in allowed:
                raise ValueError(f"unknown {name} {value!r}; expected one of {list(allowed)}")

    @property
    def caption(self) -> str:
        return f"a {self.size} {self.colour} {self.shape} on a {self.background} background, {self.position}"


def parse_caption(caption: str) -> ShapeSpec:
    """The ShapeSpec a synthetic caption describes (ValueError if it is not one)."""
    m = _CAPTION.match(caption.strip())
    if not m:
        raise ValueError(f"not a synthetic caption: {caption!r}")
    size, colour, shape, background, position = m.groups()
    return ShapeSpec(colour, shape, background, position, size)


def all_specs() -> list[ShapeSpec]:
    """Every combination of the attributes, in a fixed order."""
    return [ShapeSpec(c, s, b, p, z) for c, s, b, p, z in
            itertools.product(COLOURS, SHAPES, BACKGROUNDS, POSITIONS, SIZES)]


def _choices(name: str, values: Sequence[str] | None, allowed) -> list[str]:
    """`values` checked against `allowed` (all of allowed when None); ValueError naming the allowed values."""
    if values is None:
        return list(allowed)
    if isinstance(values, str):
        values = [values]
    values = list(values)
    bad = [v for v in values if v not in allowed]
    if bad or not values:
        raise ValueError(f"unknown {name}s {bad} (or none given); expected a non-empty subset of {list(allowed)}")
    return values


def random_spec(rng: random.Random, positions: Sequence[str] | None = None,
                sizes: Sequence[str] | None = None) -> ShapeSpec:
    """A uniformly random spec; `positions` / `sizes` restrict those attributes (None: all)."""
    return ShapeSpec(rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.choice(list(BACKGROUNDS)),
                     rng.choice(_choices("position", positions, POSITIONS)), rng.choice(_choices("size", sizes, SIZES)))


def render(spec: ShapeSpec, width: int, height: int | None = None) -> Image.Image:
    """Draw `spec` as an RGB image of width x height (square if height is None), anti-aliased."""
    height = width if height is None else height
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    ss = max(1, min(4, 2048 // max(width, height)))  # supersampling factor for smooth edges
    W, H = width * ss, height * ss
    im = Image.new("RGB", (W, H), BACKGROUNDS[spec.background])
    side = min(W, H)
    ox, oy = (W - side) / 2, (H - side) / 2  # central square: what a center crop keeps
    fx, fy = POSITIONS[spec.position]
    cx, cy, r = ox + fx * side, oy + fy * side, SIZES[spec.size] * side
    draw, fill = ImageDraw.Draw(im), COLOURS[spec.colour]
    if spec.shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif spec.shape == "square":
        h = 0.85 * r  # area close to the circle's
        draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=fill)
    else:  # triangle pointing up
        draw.polygon([(cx, cy - r), (cx - r, cy + 0.8 * r), (cx + r, cy + 0.8 * r)], fill=fill)
    return im.resize((width, height), Image.BOX) if ss > 1 else im


def render_array(spec: ShapeSpec, size: int) -> np.ndarray:
    """`spec` as a (3, size, size) float32 array in [-1, 1], the layout of preprocessed and decoded samples."""
    return to_signed(np.asarray(render(spec, size)))  # (3, size, size)


# ------------------------------------------------------------------------------------------ dataset

@dataclass
class Entry:
    """One row of the dataset: its file (relative to the folder), caption, kind and pixel size."""

    key: str
    file: str
    caption: str
    kind: str  # "ok", "opt_out" or one of BAD_KINDS
    width: int
    height: int

    @property
    def expected_ok(self) -> bool:
        """Whether a correct download + decode (honouring opt-outs) keeps this entry."""
        return EXPECTED_OK[self.kind]


@dataclass
class SyntheticDataset:
    """A folder of synthetic images with its manifest; turns into URL rows once a server's base URL is known."""

    folder: str
    params: dict
    entries: list[Entry]

    @property
    def opt_out_files(self) -> list[str]:
        return [e.file for e in self.entries if e.kind == "opt_out"]

    def rows(self, base_url: str) -> list[dict]:
        """[{url, caption}] for every entry, in order."""
        base = base_url.rstrip("/")
        return [{"url": f"{base}/{e.file}", "caption": e.caption} for e in self.entries]

    def write_url_list(self, uri: str, base_url: str) -> str:
        """Write the rows as a Parquet URL list (url, caption) to a local path or s3:// URI, atomically."""
        import pyarrow as pa

        rows = self.rows(base_url)
        table = pa.table({"url": pa.array([r["url"] for r in rows], pa.string()),
                          "caption": pa.array([r["caption"] for r in rows], pa.string())})
        storage.write_parquet(uri, table)
        return uri


def write_synthetic_dataset(folder, n: int, size: int = 128, seed: int = 0, bad_fraction: float = 0.0,
                            opt_out_fraction: float = 0.0, large_fraction: float = 0.5,
                            positions: Sequence[str] | None = None,
                            sizes: Sequence[str] | None = None) -> SyntheticDataset:
    """Write n captioned images (+ manifest.json, last) under folder/images; rerunning with the same args is a no-op.

    Short sides: `large_fraction` of images in [size, 1.25 size], the rest in [size/2, size); aspect up to 1.5.
    `bad_fraction` of entries cycle through BAD_KINDS; `opt_out_fraction` are served with X-Robots-Tag: noai.
    `positions` / `sizes` restrict the drawn shapes to those names of POSITIONS / SIZES (None: all, the default);
    fewer combinations make the dataset easier to learn from a few hundred images.
    """
    position_names = _choices("position", positions, POSITIONS)
    size_names = _choices("size", sizes, SIZES)
    if n < 0 or size < 8:
        raise ValueError(f"expected n >= 0 and size >= 8, got n={n}, size={size}")
    for name, frac in (("bad_fraction", bad_fraction), ("opt_out_fraction", opt_out_fraction),
                       ("large_fraction", large_fraction)):
        if not 0.0 <= frac <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {frac}")
    if bad_fraction + opt_out_fraction > 1.0:
        raise ValueError(f"bad_fraction + opt_out_fraction must be <= 1, got {bad_fraction + opt_out_fraction}")
    params = dict(n=n, size=size, seed=seed, bad_fraction=bad_fraction, opt_out_fraction=opt_out_fraction,
                  large_fraction=large_fraction)
    if positions is not None:  # only when restricted, so unrestricted manifests (and their reuse) are unchanged
        params["positions"] = position_names
    if sizes is not None:
        params["sizes"] = size_names
    folder = Path(folder)
    existing = load_synthetic_dataset(folder) if (folder / MANIFEST).is_file() else None
    if existing is not None and existing.params == params:
        return existing

    order = list(range(n))
    random.Random(f"{seed}-kinds").shuffle(order)
    n_bad, n_opt = round(n * bad_fraction), round(n * opt_out_fraction)
    kinds = ["ok"] * n
    for j, i in enumerate(order[:n_bad]):
        kinds[i] = BAD_KINDS[j % len(BAD_KINDS)]
    for i in order[n_bad:n_bad + n_opt]:
        kinds[i] = "opt_out"

    (folder / "images").mkdir(parents=True, exist_ok=True)
    entries = [_write_entry(folder, i, kinds[i], size, seed, large_fraction, positions, sizes) for i in range(n)]
    ds = SyntheticDataset(str(folder), params, entries)
    tmp = folder / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps({"params": params, "entries": [asdict(e) for e in entries]}), encoding="utf-8")
    os.replace(tmp, folder / MANIFEST)  # written last: its presence means the folder is complete
    return ds


def load_synthetic_dataset(folder) -> SyntheticDataset:
    """The dataset a previous write_synthetic_dataset left in folder."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"no synthetic dataset manifest at {str(path)!r}")
    m = json.loads(path.read_text(encoding="utf-8"))
    return SyntheticDataset(str(folder), m["params"], [Entry(**e) for e in m["entries"]])


def _write_entry(folder: Path, i: int, kind: str, size: int, seed: int, large_fraction: float,
                 positions: Sequence[str] | None = None, sizes: Sequence[str] | None = None) -> Entry:
    rng = random.Random(f"{seed}-{i}")  # per entry, so one entry does not depend on the others
    spec = random_spec(rng, positions, sizes)
    if kind == "palette":  # transparency is composited on white: keep the caption true
        spec = ShapeSpec(spec.colour, spec.shape, "white", spec.position, spec.size)
    large = rng.random() < large_fraction
    short = rng.randint(size, round(1.25 * size)) if large else rng.randint(max(1, size // 2), size - 1)
    long = round(short * rng.uniform(1.0, 1.5))
    w, h = (long, short) if rng.random() < 0.5 else (short, long)
    key = f"{i:06d}"
    ext = {"not_an_image": "jpg", "corrupt": "jpg", "cmyk": "jpg", "tiny": "png", "palette": "png",
           "missing": "jpg"}.get(kind, rng.choice(("jpg", "png")))
    rel = f"images/{key}.{ext}"
    data: bytes | None
    if kind == "missing":
        data = None  # the URL answers 404
    elif kind == "not_an_image":
        data = b"<html><body>Sorry, this page is not an image.</body></html>\n"
    elif kind == "tiny":
        w = h = 8
        data = _encode(render(spec, w, h), "PNG")
    elif kind == "corrupt":
        full = _encode(render(spec, w, h), "JPEG")
        data = full[: len(full) // 2]  # truncated mid-scan
    elif kind == "cmyk":
        data = _encode(render(spec, w, h).convert("CMYK"), "JPEG")
    elif kind == "palette":
        p = render(spec, w, h).quantize(colors=16)
        bg_index = p.getpixel((0, 0))  # a corner is always background
        data = _encode(p, "PNG", transparency=bg_index)
    else:
        data = _encode(render(spec, w, h), "JPEG" if ext == "jpg" else "PNG")
    if data is not None:
        path = folder / rel
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
    return Entry(key, rel, spec.caption, kind, w, h)


def _encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **({"quality": 95} if fmt == "JPEG" else {}), **kw)
    return buf.getvalue()


# ------------------------------------------------------------------------------------------- server

class FolderServer:
    """A threaded HTTP server for one folder on loopback; files in `opt_out` carry an X-Robots-Tag header."""

    def __init__(self, folder, host: str = "127.0.0.1", port: int = 0, opt_out: Iterable[str] | None = None,
                 robots_tag: str = "noai"):
        self.folder = str(Path(folder).resolve())
        if not os.path.isdir(self.folder):
            raise FileNotFoundError(f"cannot serve {self.folder!r}: not a folder")
        if opt_out is None and (Path(folder) / MANIFEST).is_file():
            opt_out = load_synthetic_dataset(folder).opt_out_files
        self.opt_out = {p.lstrip("/") for p in (opt_out or ())}  # paths relative to folder; mutable
        self.robots_tag = robots_tag
        self._httpd = http.server.ThreadingHTTPServer((host, port), _handler(self))
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="synthetic-http", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        """Base URL, e.g. http://127.0.0.1:43210 (no trailing slash)."""
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def close(self) -> None:
        """Stop serving and release the port; safe to call twice."""
        if self._thread.is_alive():
            self._httpd.shutdown()
            self._thread.join()
            self._httpd.server_close()

    def __enter__(self) -> "FolderServer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _handler(server: FolderServer):
    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=server.folder, **kwargs)

        def end_headers(self):
            path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path).lstrip("/")
            if path in server.opt_out:
                self.send_header("X-Robots-Tag", server.robots_tag)
            super().end_headers()

        def log_message(self, format, *args):  # quiet: tests and downloads make thousands of requests
            pass

    return Handler


def serve_folder(folder, host: str = "127.0.0.1", port: int = 0, opt_out: Iterable[str] | None = None,
                 robots_tag: str = "noai") -> FolderServer:
    """Start serving folder in a background thread; use as a context manager or call close().

    opt_out: files (relative to folder) answered with `X-Robots-Tag: robots_tag`; by default the opt-out
    entries of a synthetic dataset's manifest.
    """
    return FolderServer(folder, host, port, opt_out, robots_tag)
