"""What the download step swaps into img2dataset 1.47: our image decoder as its resizer, and a fetch with a deadline.

- `PolicyResizer`: img2dataset decodes with `cv2.imdecode(IMREAD_UNCHANGED)`, which keeps 16-bit and float pixels
  (re-encoded to 8-bit JPEG they saturate to white), ignores EXIF orientation, and decodes any declared size in
  full (a 388 KB PNG of 20000 x 20000 costs ~760 MiB). Ours is `pipeline.core.images.decode_image`, the decoder of
  archive ingestion and precompute: header-checked against `max_pixels` before any pixel is decoded, every PIL mode
  converted to 8-bit RGB (alpha on white), then the same size policy and re-encoding as archive ingestion.
- `fetch`: img2dataset's urllib timeout bounds each socket operation, so a server trickling a byte every few
  seconds holds a download slot for as long as it likes. Ours bounds the whole transfer (connect, headers, body,
  redirects) by a deadline, shutting the socket down when it passes: the row fails with reason `transfer_timeout`.

Both run inside img2dataset's own (spawned) worker processes, so they live in this importable module.
"""
from __future__ import annotations

import http.client
import io
import os
import socket
import threading
import time
import urllib.request

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # img2dataset imports albumentations: no network check
import img2dataset.downloader as i2d_downloader  # noqa: E402

from pipeline.data.sources.shards import IngestConfig, encode_image  # noqa: E402

TRANSFER_TIMEOUT = "transfer_timeout"  # the failure reason (a reason name: bucketed as is, not retried)
_CHUNK = 1 << 16


class PolicyResizer:
    """img2dataset's Resizer interface over our decode + size policy + re-encode (`shards.encode_image`)."""

    def __init__(self, policy: IngestConfig):
        self.policy = policy

    def __call__(self, img_stream, blurring_bbox_list=None):
        """-> (bytes, width, height, original_width, original_height, error): img2dataset's contract."""
        if blurring_bbox_list is not None:
            return None, None, None, None, None, "blurring is not supported by the microdit resizer"
        img_stream.seek(0)
        enc = encode_image(img_stream.read(), self.policy)
        if enc.data is None:
            return None, None, None, None, None, enc.reason
        return enc.data, enc.width, enc.height, enc.original_width, enc.original_height, None


class DeadlineDownloader(i2d_downloader.Downloader):
    """img2dataset's Downloader whose URL fetches each have a total deadline of `total_timeout` seconds."""

    def __init__(self, *args, total_timeout: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.total_timeout = total_timeout

    def __call__(self, row):
        # Runs in the worker process (the instance is pickled there): point img2dataset's fetch at ours.
        i2d_downloader.download_image = _with_deadline(self.total_timeout)
        return super().__call__(row)


def _with_deadline(total_timeout: float):
    def download_image(row, timeout, user_agent_token, disallowed_header_directives):
        return fetch(row, timeout, total_timeout, user_agent_token, disallowed_header_directives)
    return download_image


# ------------------------------------------------------------------------------------------- fetch

class _Deadline:
    """Shuts down every socket armed on it once `seconds` have passed, waking any blocked read."""

    def __init__(self, seconds: float):
        self.at = time.monotonic() + seconds
        self.fired = False
        self._socks: list[socket.socket] = []  # our own dups: their fds are never reused under us
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._fire)
        self._timer.daemon = True
        self._timer.start()

    @property
    def passed(self) -> bool:
        return self.fired or time.monotonic() >= self.at

    def arm(self, sock: socket.socket) -> None:
        with self._lock:
            self._socks.append(sock.dup())
            if self.fired:
                self._shut()

    def _fire(self) -> None:
        with self._lock:
            self.fired = True
            self._shut()

    def _shut(self) -> None:
        for s in self._socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
        self._socks.clear()

    def close(self) -> None:
        self._timer.cancel()
        with self._lock:
            for s in self._socks:
                s.close()
            self._socks.clear()


_current = threading.local()  # the deadline of the fetch running on this thread


def _create_connection(*args, **kwargs) -> socket.socket:
    sock = socket.create_connection(*args, **kwargs)
    deadline = getattr(_current, "deadline", None)
    if deadline is not None:
        deadline.arm(sock)
    return sock


class _HTTPConnection(http.client.HTTPConnection):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._create_connection = _create_connection


class _HTTPSConnection(http.client.HTTPSConnection):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._create_connection = _create_connection  # armed before the TLS handshake


class _HTTPHandler(urllib.request.HTTPHandler):
    def http_open(self, req):
        return self.do_open(_HTTPConnection, req)


class _HTTPSHandler(urllib.request.HTTPSHandler):
    def https_open(self, req):
        return self.do_open(_HTTPSConnection, req, context=self._context)


_opener = urllib.request.build_opener(_HTTPHandler, _HTTPSHandler)


def fetch(row, timeout: float, total_timeout: float, user_agent_token: str | None,
          disallowed_header_directives) -> tuple:
    """img2dataset's `download_image` (same inputs and `(key, stream | None, error)`) with a total deadline."""
    key, url = row
    user_agent = "Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:72.0) Gecko/20100101 Firefox/72.0"
    if user_agent_token:
        user_agent += f" (compatible; {user_agent_token}; +https://github.com/rom1504/img2dataset)"
    deadline = _Deadline(total_timeout)
    _current.deadline = deadline
    try:
        request = urllib.request.Request(url, data=None, headers={"User-Agent": user_agent})
        with _opener.open(request, timeout=min(timeout, total_timeout)) as r:
            if disallowed_header_directives and i2d_downloader.is_disallowed(
                    r.headers, user_agent_token, disallowed_header_directives):
                return key, None, "Use of image disallowed by X-Robots-Tag directive"
            buf = io.BytesIO()
            while chunk := r.read(_CHUNK):
                buf.write(chunk)
                if deadline.passed:
                    return key, None, TRANSFER_TIMEOUT
            if deadline.passed:  # the socket was shut mid-body: what was read is a truncated image
                return key, None, TRANSFER_TIMEOUT
        buf.seek(0)
        return key, buf, None
    except Exception as err:  # noqa: BLE001 - img2dataset's contract: the error as text, bucketed later
        return key, None, TRANSFER_TIMEOUT if deadline.passed else str(err)
    finally:
        _current.deadline = None
        deadline.close()
