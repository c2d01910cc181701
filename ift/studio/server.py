"""Serving the studio: a socket bound to 127.0.0.1 unless told otherwise, and uvicorn running the app on it."""

from __future__ import annotations

import ipaddress
import socket
import threading
from dataclasses import dataclass, replace

from ift.errors import IftError
from ift.studio.app import StudioConfig, create_app

LOOPBACK = "127.0.0.1"


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def bind(host: str = LOOPBACK, port: int = 7860) -> socket.socket:
    """A listening socket; port 0 takes a free one. A busy port is one clear error."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise IftError(f"cannot listen on {host}:{port}: {err.strerror or err}", "--host/--port",
                       "choose another --port (0 takes a free one)") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


@dataclass
class Running:
    """A studio serving in a background thread (tests, notebooks); `stop()` ends it."""

    url: str
    address: tuple
    server: object
    thread: threading.Thread

    def stop(self) -> None:
        self.server.should_exit = True  # type: ignore[attr-defined]
        self.thread.join(timeout=10)


LOOPBACK_NAMES = ["127.0.0.1", "localhost", "::1", "[::1]"]


def _server(config: StudioConfig, host: str, log_level: str):
    import uvicorn

    if config.allowed_hosts is None and is_loopback(host):
        config = replace(config, allowed_hosts=LOOPBACK_NAMES)
    return uvicorn.Server(uvicorn.Config(create_app(config), log_level=log_level, access_log=False,
                                         lifespan="off", server_header=False))


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://{'[' + host + ']' if ':' in host else host}:{port}/"


def serve(config: StudioConfig, host: str = LOOPBACK, port: int = 7860, say=print) -> None:
    """Serve until interrupted."""
    sock = bind(host, port)
    server = _server(config, host, "warning")
    say(f"ift studio: {url_of(sock)}   (Ctrl+C stops it)")
    if not is_loopback(host):
        say(f"warning: listening on {host}: anyone who can reach this machine can read your data and write templates")
    server.run(sockets=[sock])


def start(config: StudioConfig, host: str = LOOPBACK, port: int = 0) -> Running:
    """Serve in a background thread; returns once the server accepts connections."""
    sock = bind(host, port)
    server = _server(config, host, "error")
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name="ift-studio")
    thread.start()
    for _ in range(500):
        if server.started or not thread.is_alive():
            break
        threading.Event().wait(0.01)
    if not server.started:
        raise IftError("the studio server did not start", url_of(sock), "see the log above")
    return Running(url_of(sock), sock.getsockname(), server, thread)
