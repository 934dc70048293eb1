"""A TCP proxy for fault tests: put it between a client and a real server, then break the link.

Modes (switch any time with :meth:`TcpProxy.set_mode`):

* ``open``: bytes flow both ways;
* ``refuse``: the listening socket is closed: new connections are refused, live ones are cut
  (what a stopped server or a dead host with RST looks like);
* ``hold_responses``: requests reach the server, answers are held back until the mode
  changes (the server did the work, the client never hears about it);
* ``hold_requests``: connections open but requests are held back (a hung link: the
  server never sees them).

Stdlib threads only; one pair of pump threads per connection.
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Literal

Mode = Literal["open", "refuse", "hold_responses", "hold_requests"]


class TcpProxy:
    def __init__(self, target_host: str, target_port: int, port: int = 0) -> None:
        self.target = (target_host, target_port)
        self.mode: Mode = "open"
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._released = threading.Condition(self._lock)
        self._listener: socket.socket | None = None
        self._closed = False
        self.accepted = 0
        self.port = port
        self._listen()

    # -- public -------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def set_mode(self, mode: Mode) -> None:
        with self._lock:
            old, self.mode = self.mode, mode
            self._released.notify_all()
        if mode == "refuse" and old != "refuse":
            self._stop_listening()
            self._cut_all()
        elif mode != "refuse" and old == "refuse":
            self._listen()

    def close(self) -> None:
        self._closed = True
        self.set_mode("refuse")

    def __enter__(self) -> "TcpProxy":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- listening ------------------------------------------------------------------------------
    def _listen(self) -> None:
        deadline = time.monotonic() + 10
        while True:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(("127.0.0.1", self.port))
                break
            except OSError:
                sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        sock.listen(128)
        self.port = sock.getsockname()[1]
        self._listener = sock
        threading.Thread(target=self._accept_loop, args=(sock,), daemon=True, name="proxy-accept").start()

    def _stop_listening(self) -> None:
        sock, self._listener = self._listener, None
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def _cut_all(self) -> None:
        with self._lock:
            conns = list(self._conns)
            self._conns.clear()
        for c in conns:
            try:
                c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # RST
                c.close()
            except OSError:
                pass

    def _accept_loop(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # listener closed
            try:
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns.update((client, upstream))
                self.accepted += 1
            threading.Thread(target=self._pump, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, True), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, is_response: bool) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                held = "hold_responses" if is_response else "hold_requests"
                with self._lock:
                    while self.mode == held:
                        self._released.wait(0.5)
                    if src not in self._conns:
                        break  # cut while held
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()
            with self._lock:
                self._conns.discard(src)
                self._conns.discard(dst)
