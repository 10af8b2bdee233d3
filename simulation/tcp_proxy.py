"""A TCP proxy for the outage tests and `python -m bench.outage`: forwards 127.0.0.1:<port> to
a target; `kill()` closes the listener and every open connection (clients see a reset, then
"connection refused"), `restore()` listens again on the same port, `drop_connections()` only closes the open ones. Bounded: one thread per
direction of each open connection, which the proxy closes on `kill()`."""

from __future__ import annotations

import socket
import threading


class TcpProxy:
    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self.restore()

    def restore(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(128)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def kill(self) -> None:
        with self._lock:
            listener, self._listener = self._listener, None
            doomed, self._sockets = list(self._sockets), set()
        if listener is not None:
            _close(listener)
        for sock in doomed:
            _close(sock)

    def drop_connections(self) -> None:
        """Close every open connection but keep listening: what clients see when the database
        server restarts (their pooled connections die; new ones succeed)."""
        with self._lock:
            doomed, self._sockets = list(self._sockets), set()
        for sock in doomed:
            _close(sock)

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # killed
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                _close(client)
                continue
            upstream.settimeout(None)
            with self._lock:
                if self._listener is not listener:
                    _close(client), _close(upstream)
                    return
                self._sockets |= {client, upstream}
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            _close(source), _close(sink)
            with self._lock:
                self._sockets -= {source, sink}


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()
