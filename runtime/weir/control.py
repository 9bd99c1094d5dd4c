"""Worker control API: one HTTP port serving /metrics, /healthz, /readyz, /status and POST /savepoint.

Routes (all JSON bodies are UTF-8 objects; errors are ``{"error": "<message>"}``):

==================  ======  ==================================================================
path                method  answer
==================  ======  ==================================================================
``/metrics``        GET     200, Prometheus text exposition (OpenMetrics when the scraper asks)
``/healthz``        GET     200 ``{"alive": true}`` while ``alive()`` is true, else 503
``/readyz``         GET     200 ``{"ready": true}``, or 503 ``{"ready": false, "reason": ...}``
``/status``         GET     200, the model ``status()`` returns (a worker's ``WorkerStatus``)
``/savepoint``      POST    body a ``SavepointRequest``: ``{"id": str, "path"?: str|null,
                            "stop"?: bool}``; 200 with the ``SavepointAnswer`` ``savepoint()``
                            returns; 400 bad body (naming the field); 501 when not supported
==================  ======  ==================================================================

The payloads are the models of ``weir.controlapi``; the operator parses the answers with them.

Unknown paths answer 404, a known path with another method 405. A callable that raises answers 500
with the exception's message (only the message: no traceback, no repr of arguments), or the status
of a :class:`RequestRejected`.

The callables run in the server's request threads, concurrently with the worker loop and with each
other, so they must be thread-safe: the worker is expected to hand over snapshots (copied under a
lock or published by replacing a reference) rather than let them read live state.

Savepoints are idempotent by ``id``, and that is the worker's job, not the server's: the operator may
re-POST the same id after its own restart, and the worker must answer with the existing savepoint's
state instead of taking a second one. ``savepoint()`` may block until the savepoint is complete or
return at once with an in-progress state for the operator to poll by re-POSTing the same id.
"""

from __future__ import annotations

import logging
import socket
import socketserver
import threading
from collections.abc import Callable, Mapping
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, cast
from urllib.parse import urlsplit

import orjson
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from pydantic import BaseModel

from weir.controlapi import ControlPayloadError, SavepointAnswer, SavepointRequest, parse

__all__ = [
    "MAX_BODY_BYTES",
    "ControlServer",
    "RequestRejected",
]

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 64 * 1024
"""Largest POST body accepted (bytes). A savepoint request is a few hundred bytes; the bound keeps a
confused client from making a request thread buffer an arbitrary upload."""

_POLL_INTERVAL_S = 0.1
"""How often the serving loop checks for shutdown, seconds; bounds how long ``ControlServer.stop`` takes."""

_REQUEST_TIMEOUT_S = 10.0
"""Socket timeout per connection, seconds: a client stalling mid-request cannot hold a thread forever."""


class RequestRejected(Exception):
    """Raised by a callable to answer with a client error instead of 500.

    For example a savepoint whose ``id`` was already used with a different ``path`` or ``stop``
    (409 Conflict). The message is sent to the client, so it must not contain secrets.
    """

    def __init__(self, message: str, status: int = HTTPStatus.CONFLICT) -> None:
        super().__init__(message)
        self.status = int(status)


class ControlServer:
    """The worker's HTTP control API on one port; see the module docstring for the routes.

    ``registry`` is what ``/metrics`` exposes (``WorkerMetrics.registry``). ``alive()`` says the worker
    loop is still making progress (liveness); ``ready()`` returns ``(ready, reason)``; ``status()``
    returns a pydantic model, serialised by alias (a worker's latest published ``WorkerStatus``; the
    operator serves its own on its health port); ``savepoint`` is ``None`` when this worker cannot
    take savepoints. All callables must be thread-safe (module docstring).

    ``host`` is the bind address (``"0.0.0.0"`` for every IPv4 interface, ``"::"`` for IPv6);
    ``port`` 0 picks a free port, readable from :attr:`port` after :meth:`start`.
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        alive: Callable[[], bool],
        ready: Callable[[], tuple[bool, str]],
        status: Callable[[], BaseModel],
        savepoint: Callable[[SavepointRequest], SavepointAnswer] | None = None,
        # Every interface: kubelet probes and Prometheus reach the pod on its pod IP, not loopback.
        host: str = "0.0.0.0",
        port: int = 0,
    ) -> None:
        self.registry = registry
        self.alive = alive
        self.ready = ready
        self.status = status
        self.savepoint = savepoint
        self.host = host
        self._requested_port = port
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The bound port; only known once started (``port=0`` asks the OS for a free one)."""
        if self._httpd is None:
            raise RuntimeError("the control server is not started")
        return int(self._httpd.server_address[1])

    def start(self) -> None:
        """Bind the port and serve from a daemon thread. Raises OSError if the port is taken."""
        if self._httpd is not None:
            raise RuntimeError("the control server is already started")
        server_class = _HTTPServer6 if ":" in self.host else _HTTPServer
        httpd = server_class((self.host, self._requested_port), _Handler)
        httpd.control = self
        self._httpd = httpd
        self._thread = threading.Thread(
            target=httpd.serve_forever, kwargs={"poll_interval": _POLL_INTERVAL_S},
            name=f"weir-control:{self.port}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop serving and close the listening socket, so the port is free on return; idempotent.

        Takes about one poll interval (0.1 s). Requests already running (e.g. a slow ``savepoint()``)
        are not waited for: their threads are daemons and finish or die with the process.
        """
        httpd, thread = self._httpd, self._thread
        if httpd is None:
            return
        self._httpd = self._thread = None
        httpd.shutdown()
        httpd.server_close()
        if thread is not None:
            thread.join(timeout=1.0)

    def __enter__(self) -> ControlServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    control: ControlServer

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the host's FQDN through DNS, which can stall start-up in a
        # pod whose resolver is slow; the name is only used for CGI, so skip it.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)


class _HTTPServer6(_HTTPServer):
    address_family = socket.AF_INET6


def _json(value: object) -> bytes:
    return orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS)


class _Handler(BaseHTTPRequestHandler):
    # HTTP/1.0: one request per connection, so no idle keep-alive connection outlives stop().
    protocol_version = "HTTP/1.0"
    server_version = "weir-control"
    timeout = _REQUEST_TIMEOUT_S
    _responded = False

    _ROUTES: dict[str, dict[str, str]] = {
        "/metrics": {"GET": "_metrics"},
        "/healthz": {"GET": "_healthz"},
        "/readyz": {"GET": "_readyz"},
        "/status": {"GET": "_status"},
        "/savepoint": {"POST": "_savepoint"},
    }

    def version_string(self) -> str:
        # The stdlib appends the Python version; a probe target has no reason to advertise it.
        return self.server_version

    @property
    def control(self) -> ControlServer:
        return cast(_HTTPServer, self.server).control

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def do_PATCH(self) -> None:
        self._dispatch("PATCH")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def _dispatch(self, method: str) -> None:
        path = urlsplit(self.path).path
        methods = self._ROUTES.get(path)
        if methods is None:
            self._send_json(HTTPStatus.NOT_FOUND, {"error": f"no route {path}"})
            return
        handler = methods.get(method)
        if handler is None:
            allowed = ", ".join(sorted(methods))
            self._send_json(HTTPStatus.METHOD_NOT_ALLOWED, {"error": f"{method} not allowed on {path}"},
                            headers={"Allow": allowed})
            return
        try:
            getattr(self, handler)()
        except RequestRejected as exc:
            self._send_json(exc.status, {"error": str(exc)})
        except Exception as exc:
            logger.exception("control API %s %s failed", method, path)
            if self._responded:
                return  # the status line is out (e.g. the client hung up mid-body); nothing to correct
            self._send_json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": str(exc) or type(exc).__name__})

    def _metrics(self) -> None:
        encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
        self._send(HTTPStatus.OK, encoder(self.control.registry), content_type)

    def _healthz(self) -> None:
        alive = bool(self.control.alive())
        self._send_json(HTTPStatus.OK if alive else HTTPStatus.SERVICE_UNAVAILABLE, {"alive": alive})

    def _readyz(self) -> None:
        ready, reason = self.control.ready()
        if ready:
            self._send_json(HTTPStatus.OK, {"ready": True})
        else:
            self._send_json(HTTPStatus.SERVICE_UNAVAILABLE, {"ready": False, "reason": reason})

    def _status(self) -> None:
        # Serialised here, in the request thread, not in the worker loop that published it.
        body = self.control.status().model_dump_json(by_alias=True).encode()
        self._send(HTTPStatus.OK, body, "application/json")

    def _savepoint(self) -> None:
        savepoint = self.control.savepoint
        if savepoint is None:
            self._send_json(HTTPStatus.NOT_IMPLEMENTED, {"error": "this worker does not take savepoints"})
            return
        request = self._read_savepoint_request()
        if request is not None:
            self._send(HTTPStatus.OK, savepoint(request).model_dump_json(by_alias=True).encode(),
                       "application/json")

    def _read_savepoint_request(self) -> SavepointRequest | None:
        """The validated body, or None after answering 400/413."""
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            self._send_json(HTTPStatus.BAD_REQUEST, {"error": "a JSON body with Content-Length is required"})
            return None
        if length > MAX_BODY_BYTES:
            self._send_json(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                            {"error": f"body larger than {MAX_BODY_BYTES} bytes"})
            return None
        try:
            body = orjson.loads(self.rfile.read(length)) if length > 0 else None
        except orjson.JSONDecodeError as exc:
            self._send_json(HTTPStatus.BAD_REQUEST, {"error": f"body is not valid JSON: {exc}"})
            return None
        try:
            return parse(SavepointRequest, body)
        except ControlPayloadError as exc:
            self._send_json(HTTPStatus.BAD_REQUEST, {"error": str(exc)})
            return None

    def _send_json(self, status: int, value: object, headers: Mapping[str, str] | None = None) -> None:
        self._send(status, _json(value), "application/json", headers)

    def _send(self, status: int, body: bytes, content_type: str,
              headers: Mapping[str, str] | None = None) -> None:
        self._responded = True
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        # Probes and scrapes arrive every few seconds; the stdlib would print each to stderr.
        logger.debug("control API %s: " + format, self.client_address[0], *args)

