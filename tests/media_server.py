"""A loopback HTTP server for download tests: byte ranges (ffmpeg seeks with them) and faults.

Paths (relative to the served folder):
    /<file>               the file, with Range support
    /missing/<file>       404 Not Found
    /status<C>/<file>     HTTP status C (404, 410, 429, 500, 503, ...) on every request
    /fail<C>x<N>/<file>   HTTP status C for the first N requests of that path, then the file
    /flaky<N>/<file>      429 Too Many Requests for the first N requests of that path, then the file
    /drop/<file>          the headers of the whole file, half of the body, then the connection closes
    /html/<file>          200 with an HTML page instead of the media (a login wall or an error page)
    /slow/<file>          the file, each response delayed by ``delay`` seconds
Every request is recorded in ``requests`` as (path, Range header). :func:`refused_url` gives a
URL on which nothing listens (connection refused).
"""

from __future__ import annotations

import http.server
import re
import socket
import threading
import time
from collections import Counter
from pathlib import Path

_HTML = b"<!DOCTYPE html><html><head><title>Sign in</title></head><body><p>Please sign in.</p></body></html>\n"


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
                name, fault = parts[-1], parts[0] if len(parts) > 1 else ""
                if fault == "missing":
                    return self.send_error(404)
                if m := re.fullmatch(r"status(\d{3})", fault):
                    return self.send_error(int(m.group(1)))
                if (m := re.fullmatch(r"fail(\d{3})x(\d+)", fault)) and count <= int(m.group(2)):
                    return self.send_error(int(m.group(1)))
                if (m := re.fullmatch(r"flaky(\d+)", fault)) and count <= int(m.group(1)):
                    return self.send_error(429)
                if fault == "html":
                    return self._send(200, "text/html", _HTML if body else b"", len(_HTML))
                if fault == "slow":
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
                with open(file, "rb") as f:
                    f.seek(first)
                    data = f.read(last - first + 1) if body else b""
                if fault == "drop":
                    data = data[: len(data) // 2]
                    self.close_connection = True
                self.send_header("Content-Type", "video/mp4")
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("Content-Length", str(last - first + 1))
                self.end_headers()
                self._write(data)

            def _send(self, code: int, kind: str, data: bytes, length: int) -> None:
                self.send_response(code)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(length))
                self.end_headers()
                self._write(data)

            def _write(self, data: bytes) -> None:
                try:
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client stopped reading (ffmpeg often does)

        return Handler


def served_path(url: str) -> str:
    return "/" + url.split("/", 3)[3]


def refused_url(name: str = "clip.mp4") -> str:
    """An http URL on a loopback port that nothing listens on: connection refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/{name}"


__all__ = ["MediaServer", "refused_url", "served_path"]
