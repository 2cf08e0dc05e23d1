"""A loopback TCP proxy that a test can cut and restore, or stall and resume, to put a real
outage between the code under test and a server (Redis, PostgreSQL)."""

from __future__ import annotations

import contextlib
import selectors
import socket
import threading

_CHUNK = 64 * 1024


class TcpProxy:
    """Listens on 127.0.0.1 (a free port) and forwards each connection to ``target``.

    ``cut()`` closes every open connection and turns new ones away (accepted, then closed at
    once, so clients fail fast instead of hanging); ``restore()`` forwards again;
    ``stall()`` keeps every connection open and accepts new ones but forwards nothing, in
    either direction, and resets nothing (a peer that stops answering: bytes sent to it are
    still acknowledged by this host's kernel) until ``resume()``; ``close()`` stops
    everything. Threads are bounded: one accept thread, and one pump thread per connection
    up to ``max_connections`` (connections beyond it are closed).
    """

    def __init__(
        self,
        target_host: str,
        target_port: int,
        *,
        max_connections: int = 64,
        connect_timeout: float = 2.0,
    ) -> None:
        self.target = (target_host, target_port)
        self._max = max_connections
        self._connect_timeout = connect_timeout
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.host, self.port = self._listener.getsockname()[:2]
        self._lock = threading.Lock()
        self._pairs: set[tuple[socket.socket, socket.socket]] = set()
        self._threads: set[threading.Thread] = set()
        self._cut = False
        self._closed = False
        self._flowing = threading.Event()  # cleared while stalled
        self._flowing.set()
        self.accepted = 0
        self.refused = 0
        self._acceptor = threading.Thread(target=self._accept_loop, name="tcp-proxy", daemon=True)
        self._acceptor.start()

    @property
    def address(self) -> tuple[str, int]:
        """Where clients should connect."""
        return self.host, self.port

    def url(self, scheme: str, path: str = "") -> str:
        """A URL for ``scheme`` pointing at the proxy, e.g. ``url("redis", "/0")``."""
        return f"{scheme}://{self.host}:{self.port}{path}"

    @property
    def open_connections(self) -> int:
        """How many client connections are being forwarded right now."""
        with self._lock:
            return len(self._pairs)

    def cut(self) -> None:
        """Drop every connection and turn new ones away until ``restore()``."""
        with self._lock:
            self._cut = True
            pairs = list(self._pairs)
        for pair in pairs:
            self._drop(pair)

    def restore(self) -> None:
        """Forward new connections again."""
        with self._lock:
            self._cut = False

    def stall(self) -> None:
        """Forward nothing, on open connections and new ones, until ``resume()``."""
        self._flowing.clear()

    def resume(self) -> None:
        """Forward again what was held during a stall, and whatever comes next."""
        self._flowing.set()

    def close(self) -> None:
        """Stop listening, drop every connection and wait for the threads to end."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            pairs = list(self._pairs)
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        for pair in pairs:
            self._drop(pair)
        self._acceptor.join(timeout=5)
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(timeout=5)

    def __enter__(self) -> TcpProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ internals

    def _accept_loop(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # the listener was closed
            with self._lock:
                turn_away = self._closed or self._cut or len(self._pairs) >= self._max
            if turn_away:
                with self._lock:
                    self.refused += 1
                _hard_close(client)
                if self._closed:
                    return
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=self._connect_timeout)
            except OSError:
                _hard_close(client)
                continue
            upstream.settimeout(None)
            pair = (client, upstream)
            thread = threading.Thread(
                target=self._pump, args=(pair,), name="tcp-proxy-pump", daemon=True
            )
            with self._lock:
                if self._cut or self._closed:
                    turn_away = True
                else:
                    self._pairs.add(pair)
                    self._threads.add(thread)
                    self.accepted += 1
            if turn_away:
                _hard_close(client)
                _hard_close(upstream)
                continue
            thread.start()

    def _pump(self, pair: tuple[socket.socket, socket.socket]) -> None:
        client, upstream = pair
        peer = {client: upstream, upstream: client}
        try:
            with selectors.DefaultSelector() as sel:
                sel.register(client, selectors.EVENT_READ)
                sel.register(upstream, selectors.EVENT_READ)
                while True:
                    if not self._flowing.wait(timeout=0.5):  # stalled: read nothing
                        with self._lock:
                            if pair not in self._pairs:
                                return
                        continue
                    for key, _ in sel.select(timeout=0.5):
                        source: socket.socket = key.fileobj  # type: ignore[assignment]
                        data = source.recv(_CHUNK)
                        if not data:
                            return
                        peer[source].sendall(data)
                    with self._lock:
                        if pair not in self._pairs:
                            return
        except (OSError, ValueError):
            return  # closed under us by cut() or close(), or by a peer
        finally:
            with self._lock:
                self._pairs.discard(pair)
                self._threads.discard(threading.current_thread())
            for sock in pair:
                _hard_close(sock)

    def _drop(self, pair: tuple[socket.socket, socket.socket]) -> None:
        # Shut down only: the pump thread wakes on it and closes the sockets itself, so no
        # descriptor is closed (and possibly reused) while it is still being selected on.
        with self._lock:
            self._pairs.discard(pair)
        for sock in pair:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


def _hard_close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()
