"""A loopback HTTP server for download tests: byte ranges (ffmpeg seeks with them) and faults.

Paths (relative to the served folder):
    /<file>             the file, with Range support
    /missing/<file>     404 Not Found
    /flaky<N>/<file>    429 Too Many Requests for the first N requests of that path, then the file
    /slow/<file>        the file, each response delayed by ``delay`` seconds
Every request is recorded in ``requests`` as (path, Range header).
"""

from __future__ import annotations

import http.server
import re
import threading
import time
from collections import Counter
from pathlib import Path


class MediaServer:
    def __init__(self, root: str | Path, delay: float = 0.5):
        self.root = Path(root)
        self.delay = delay
        self.requests: list[tuple[str, str]] = []
        self._counts: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> MediaServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def hits(self, path: str) -> int:
        with self._lock:
            return sum(1 for p, _ in self.requests if p == path)

    def _handler(self):
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep test output clean
                pass

            def do_HEAD(self) -> None:
                self._serve(body=False)

            def do_GET(self) -> None:
                self._serve(body=True)

            def _serve(self, body: bool) -> None:
                path = self.path.split("?")[0]
                with server._lock:
                    server.requests.append((path, self.headers.get("Range", "")))
                    server._counts[path] += 1
                    count = server._counts[path]
                parts = path.strip("/").split("/")
                name = parts[-1]
                if parts[0] == "missing":
                    return self.send_error(404)
                if (m := re.fullmatch(r"flaky(\d+)", parts[0])) and count <= int(m.group(1)):
                    return self.send_error(429)
                if parts[0] == "slow":
                    time.sleep(server.delay)
                file = server.root / name
                if not file.is_file():
                    return self.send_error(404)
                size = file.stat().st_size
                first, last = 0, size - 1
                if m := re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", "")):
                    first = int(m.group(1))
                    last = min(int(m.group(2)), size - 1) if m.group(2) else size - 1
                    if first >= size:
                        return self.send_error(416)
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {first}-{last}/{size}")
                else:
                    self.send_response(200)
                self.send_header("Content-Type", "video/mp4")
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("Content-Length", str(last - first + 1))
                self.end_headers()
                if body:
                    with open(file, "rb") as f:
                        f.seek(first)
                        try:
                            self.wfile.write(f.read(last - first + 1))
                        except (BrokenPipeError, ConnectionResetError):
                            pass  # the client stopped reading (ffmpeg often does)

        return Handler


def served_path(url: str) -> str:
    return "/" + url.split("/", 3)[3]


__all__ = ["MediaServer", "served_path"]
