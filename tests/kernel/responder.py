"""Helpers shared by the eBPF kernel tests: a threaded one-socket responder."""
from __future__ import annotations

import socket
import subprocess
import threading


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=5)


class Responder:
    """Accepts on one listening socket in a thread; answers each connection with reply(conn)."""

    def __init__(self, sock: socket.socket, reply):
        self.sock = sock
        self.reply = reply
        self.stop = threading.Event()
        sock.settimeout(0.1)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            with conn:
                try:
                    answer = self.reply(conn)
                except Exception as exc:   # shown in the asserting test's answer
                    answer = f"error {exc!r}"
                conn.sendall(answer.encode() + b"\n")

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=2)
        self.sock.close()


def fmt(addr) -> str:
    return f"{addr[0]}:{addr[1]}" if addr else "-"
