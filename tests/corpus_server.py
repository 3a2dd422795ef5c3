"""An HTTP server on 127.0.0.1 for the corpus tests: the real photos, and the ways downloads fail.

    /img/NAME        the real file NAME            /slow/NAME       answers after ``slow_s`` seconds
    /missing/NAME    404                           /truncated/NAME  the first 60% of NAME's bytes
    /corrupt/NAME    bytes that are no image       /huge/NAME       a 6000x6000 PNG (a few KB)

Every request path is counted in ``hits`` (to check that a resumed fetch asks nothing twice). The
server runs in a daemon thread and stops when the context manager exits."""

from __future__ import annotations

import io
import json
import threading
import time
from collections import Counter
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

SAMPLE_BASE = "http://127.0.0.1:8765"  # what tests/data samples name; rewritten to the live server


def _huge_png() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (6000, 6000), 200).save(buf, format="PNG")
    return buf.getvalue()


@contextmanager
def serve(real_dir: Path, slow_s: float = 4.0):
    hits: Counter = Counter()
    huge = _huge_png()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a):  # keep test output clean
            pass

        def do_GET(self):
            hits[self.path] += 1
            _, route, name = (self.path.split("/", 2) + ["", ""])[:3]
            src = real_dir / name
            if route == "slow":
                time.sleep(slow_s)
            if route in ("img", "slow", "truncated") and src.is_file():
                body = src.read_bytes()
                body = body[: int(len(body) * 0.6)] if route == "truncated" else body
            elif route == "corrupt":
                body = b"\x89PNG\r\n\x1a\n" + b"not really an image" * 50
            elif route == "huge":
                body = huge
            else:
                body = None
            try:
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up (the slow route): nothing to do

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", hits
    finally:
        server.shutdown()
        server.server_close()


def localize(sample: Path, base: str, dest: Path) -> Path:
    """Copy a tests/data sample to ``dest`` with its URLs pointing at the live server ``base``."""
    dest.write_text(sample.read_text(encoding="utf-8").replace(SAMPLE_BASE, base), encoding="utf-8")
    return dest


def records(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]
