"""A loopback (127.0.0.1 only) HTTP server for tests and benchmarks; the folder it serves is laid out like
the Vesuvius data server by `tests.synthetic` (`write_server_segment`, `write_server_layers`).

It serves a folder, counts every request by path (and the 404s), and can misbehave on purpose:
- `faults` maps a fault kind to the fraction of chunk requests that get it ("429", "500", "truncate",
  "drop", "delay"), drawn from a seeded generator so a run is reproducible. Metadata keys (.zarray,
  zarr.json, ...) and images are served cleanly unless `fault_everything` is set, so tests can aim faults
  at chunks;
- `scripted_status` maps a path to the statuses its next requests get (`[404]`: a 404 once, then the file);
- `permanent_status` maps a path to a status it always gets;
- `basic_auth=(login, password)` demands HTTP Basic auth, as the data server has in the past (401 without it);
- `body_faults` maps a path to the bad 200 answers its next requests get, in order, then the file:
  "html" (an HTML page in place of the file, as a proxy's error page), "short" (the file cut short, with a
  Content-Length that matches the cut: only a check of the body itself can tell), "drip" (the file one byte
  every `drip_seconds`; it ends when the client hangs up, the server stops, or after `DRIP_LIMIT_SECONDS`).
"""
import base64
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
HTML_PAGE = b"<!DOCTYPE html>\n<html><head><title>Service Unavailable</title></head><body>Try later.</body></html>\n"
DRIP_LIMIT_SECONDS = 60.0  # a dripping answer never outlives a test
IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg")


class LoopbackServer:
    def __init__(self, root: pathlib.Path, faults: dict[str, float] | None = None, seed: int = 0,
                 fault_everything: bool = False, delay_seconds: float = 0.2, chunk_delay_seconds: float = 0.0,
                 basic_auth: tuple[str, str] | None = None):
        self.root = pathlib.Path(root)
        self.faults = dict(faults or {})
        self.fault_everything = fault_everything
        self.delay_seconds = delay_seconds
        self.chunk_delay_seconds = chunk_delay_seconds
        self.random = random.Random(seed)
        self.lock = threading.Lock()
        self.requests: collections.Counter[str] = collections.Counter()
        self.not_found: collections.Counter[str] = collections.Counter()  # path → 404s answered
        self.unauthorized = 0  # 401s answered
        self.authorizations: set[str] = set()  # Authorization headers received
        self.fault_counts: collections.Counter[str] = collections.Counter()
        self.bytes_sent = 0
        self.active = 0
        self.max_active = 0
        self.permanent_status: dict[str, int] = {}  # path → status, e.g. a 500 that never heals
        self.scripted_status: dict[str, list[int]] = {}  # path → statuses of its next requests, in order
        self.body_faults: dict[str, list[str]] = {}  # path → its next requests' bad bodies: "html", "short", "drip"
        self.drip_seconds = 2.0
        self.stopping = threading.Event()
        self.expected_authorization = None
        if basic_auth is not None:
            token = base64.b64encode(":".join(basic_auth).encode()).decode()
            self.expected_authorization = f"Basic {token}"
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
                if server.stopping.is_set():
                    # A stopped server answers nothing, not even on a connection a client kept alive.
                    self.close_connection = True
                    return
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
        self.stopping.set()
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def chunk_requests(self) -> int:
        return sum(count for path, count in self.requests.items() if self._is_chunk(path))

    def requests_by_kind(self) -> dict[str, int]:
        """Requests so far as {"metadata", "image", "chunk", "not_found"} counts."""
        counts = collections.Counter(self.kind(path) for path in self.requests.elements())
        return {"metadata": counts["metadata"], "image": counts["image"], "chunk": counts["chunk"],
                "not_found": sum(self.not_found.values())}

    def reset_counts(self) -> None:
        with self.lock:
            self.requests.clear()
            self.not_found.clear()
            self.bytes_sent = 0

    @staticmethod
    def kind(path: str) -> str:
        name = path.rsplit("/", 1)[-1]
        if name in METADATA_NAMES:
            return "metadata"
        return "image" if name.lower().endswith(IMAGE_SUFFIXES) else "chunk"

    @classmethod
    def _is_chunk(cls, path: str) -> bool:
        return cls.kind(path) == "chunk"

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
        if self.expected_authorization is not None:
            received = handler.headers.get("Authorization")
            if received:
                with self.lock:
                    self.authorizations.add(received)
            if received != self.expected_authorization:
                with self.lock:
                    self.unauthorized += 1
                handler.send_response(401)
                handler.send_header("WWW-Authenticate", 'Basic realm="data"')
                handler.send_header("Content-Length", "0")
                handler.end_headers()
                return
        if path in self.permanent_status:
            handler.send_error(self.permanent_status[path])
            return
        with self.lock:
            scripted = self.scripted_status.get(path)
            status = scripted.pop(0) if scripted else None
        if status is not None:
            if status == 404:
                with self.lock:
                    self.not_found[path] += 1
            handler.send_error(status)
            return
        fault = self._draw_fault(path)
        if fault in ("429", "500"):
            handler.send_response(int(fault))
            handler.send_header("Content-Length", "0")
            handler.end_headers()
            return
        if not file_path.is_file():
            with self.lock:
                self.not_found[path] += 1
            handler.send_error(404)
            return
        if self.chunk_delay_seconds and self._is_chunk(path):
            time.sleep(self.chunk_delay_seconds)
        if fault == "delay":
            time.sleep(self.delay_seconds)
        body = file_path.read_bytes()
        with self.lock:
            planned = self.body_faults.get(path)
            body_fault = planned.pop(0) if planned else None
            if body_fault is not None:
                self.fault_counts[body_fault] += 1
        if body_fault is not None:
            self._send_bad_body(handler, body, body_fault)
            return
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

    def _send_bad_body(self, handler, body: bytes, body_fault: str) -> None:
        if body_fault == "html":
            body = HTML_PAGE
        elif body_fault == "short":
            body = body[: len(body) // 2]
        handler.send_response(200)
        handler.send_header("Content-Length", str(len(body)))
        handler.send_header("Content-Type", "text/html" if body_fault == "html" else "application/octet-stream")
        handler.end_headers()
        if body_fault != "drip":
            handler.wfile.write(body)
            return
        started = time.monotonic()
        with contextlib.suppress(OSError):  # the client hanging up ends the drip
            for index in range(len(body)):
                if self.stopping.wait(self.drip_seconds) or time.monotonic() - started > DRIP_LIMIT_SECONDS:
                    break
                handler.wfile.write(body[index : index + 1])
                handler.wfile.flush()
        handler.close_connection = True
