"""A TCP echo server on a fixed address:port that can stop listening (connects are refused)
and listen again: an upstream whose connects fail on demand, for outlier-detection tests."""
from __future__ import annotations

import socket
import threading


class Toggle:
    def __init__(self, host: str) -> None:
        self.host, self.port = host, 0
        self.sock = None
        self.accepted = 0
        self.listen()

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    def listen(self) -> None:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((self.host, self.port))
        s.listen(16)
        self.port = s.getsockname()[1]
        self.sock = s
        threading.Thread(target=self._serve, args=(s,), daemon=True).start()

    def _serve(self, s) -> None:
        while True:
            try:
                conn, _ = s.accept()
            except OSError:
                return
            self.accepted += 1
            with conn:
                conn.settimeout(5)
                try:
                    conn.sendall(conn.recv(100))
                except OSError:
                    pass

    def refuse(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
