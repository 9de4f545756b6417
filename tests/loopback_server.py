"""A loopback (127.0.0.1 only) HTTP server laid out like the Vesuvius data server, for tests and benchmarks.

It serves a folder, counts every request by path, and can misbehave on purpose: `faults` maps a fault
kind to the fraction of chunk requests that get it ("429", "500", "truncate", "drop", "delay"),
drawn from a seeded generator so a run is reproducible. Metadata keys (.zarray, zarr.json, ...) and
PNGs are served cleanly unless `fault_everything` is set, so tests can aim faults at chunks.
"""
import collections
import contextlib
import http.server
import pathlib
import random
import socketserver
import sys
import threading
import time

METADATA_NAMES = (".zarray", ".zgroup", ".zattrs", ".zmetadata", "zarr.json")


class LoopbackServer:
    def __init__(self, root: pathlib.Path, faults: dict[str, float] | None = None, seed: int = 0,
                 fault_everything: bool = False, delay_seconds: float = 0.2, chunk_delay_seconds: float = 0.0):
        self.root = pathlib.Path(root)
        self.faults = dict(faults or {})
        self.fault_everything = fault_everything
        self.delay_seconds = delay_seconds
        self.chunk_delay_seconds = chunk_delay_seconds
        self.random = random.Random(seed)
        self.lock = threading.Lock()
        self.requests: collections.Counter[str] = collections.Counter()
        self.fault_counts: collections.Counter[str] = collections.Counter()
        self.bytes_sent = 0
        self.active = 0
        self.max_active = 0
        self.permanent_status: dict[str, int] = {}  # path → status, e.g. a 500 that never heals
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep test output clean
                pass

            def do_HEAD(self):
                self._serve(send_body=False)

            def do_GET(self):
                self._serve(send_body=True)

            def _serve(self, send_body: bool):
                path = self.path.split("?", 1)[0]
                with server.lock:
                    server.requests[path] += 1
                    server.active += 1
                    server.max_active = max(server.max_active, server.active)
                try:
                    server._respond(self, path, send_body)
                finally:
                    with server.lock:
                        server.active -= 1

        class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
            daemon_threads = True
            allow_reuse_address = True

            def handle_error(self, request, client_address):
                # Clients that hang up (killed downloads, dropped connections) are expected here.
                if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
                    super().handle_error(request, client_address)

        self._server = Server(("127.0.0.1", 0), Handler)
        self.port = self._server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def start(self) -> "LoopbackServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def chunk_requests(self) -> int:
        return sum(count for path, count in self.requests.items() if self._is_chunk(path))

    @staticmethod
    def _is_chunk(path: str) -> bool:
        name = path.rsplit("/", 1)[-1]
        return name not in METADATA_NAMES and not name.endswith(".png")

    def _draw_fault(self, path: str) -> str | None:
        if not self.faults or not (self.fault_everything or self._is_chunk(path)):
            return None
        with self.lock:
            draw = self.random.random()
            for kind, fraction in self.faults.items():
                if draw < fraction:
                    self.fault_counts[kind] += 1
                    return kind
                draw -= fraction
        return None

    def _respond(self, handler, path: str, send_body: bool) -> None:
        file_path = (self.root / path.lstrip("/")).resolve()
        if self.root.resolve() not in file_path.parents and file_path != self.root.resolve():
            handler.send_error(403)
            return
        if path in self.permanent_status:
            handler.send_error(self.permanent_status[path])
            return
        fault = self._draw_fault(path)
        if fault in ("429", "500"):
            handler.send_response(int(fault))
            handler.send_header("Content-Length", "0")
            handler.end_headers()
            return
        if not file_path.is_file():
            handler.send_error(404)
            return
        if self.chunk_delay_seconds and self._is_chunk(path):
            time.sleep(self.chunk_delay_seconds)
        if fault == "delay":
            time.sleep(self.delay_seconds)
        body = file_path.read_bytes()
        if fault == "drop":
            # Close the connection without any answer.
            handler.close_connection = True
            with contextlib.suppress(OSError):
                handler.connection.shutdown(2)
            return
        handler.send_response(200)
        handler.send_header("Content-Length", str(len(body)))
        handler.send_header("Content-Type", "application/octet-stream")
        handler.end_headers()
        if not send_body:
            return
        if fault == "truncate":
            # Promise the whole body, send half, hang up: the client sees a short read.
            handler.wfile.write(body[: len(body) // 2])
            handler.wfile.flush()
            handler.close_connection = True
            with contextlib.suppress(OSError):
                handler.connection.shutdown(2)
            return
        handler.wfile.write(body)
        with self.lock:
            self.bytes_sent += len(body)
