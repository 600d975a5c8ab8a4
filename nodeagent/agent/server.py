"""The enrollment socket: ``<state-dir>/agent.sock`` (0600), NDJSON requests.

The server is the thin asyncio edge over ``protocol`` (parsing) and a handler
(the agent). The client is blocking and used by the CLI and the CNI plugin.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from pathlib import Path
from typing import Any, Awaitable, Callable

from nodeagent.agent import protocol

log = logging.getLogger("nodeagent.agent.server")

SOCKET_NAME = "agent.sock"
Handler = Callable[[protocol.Request], Awaitable[dict[str, Any]]]


class AgentNotRunning(Exception):
    pass


class SocketInUse(Exception):
    pass


def socket_alive(path: Path, timeout: float = 0.5) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
        except OSError:
            return False
    return True


class EnrollmentServer:
    def __init__(self, path: Path, handler: Handler) -> None:
        self.path = path
        self.handler = handler
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        if self.path.exists() or self.path.is_symlink():
            if socket_alive(self.path):
                raise SocketInUse(f"another agent is already serving {self.path}; stop it or use another --state-dir")
            self.path.unlink()  # left by an agent that did not exit cleanly
        self._server = await asyncio.start_unix_server(self._serve, path=str(self.path), limit=protocol.MAX_LINE + 1)
        os.chmod(self.path, 0o600)

    async def close(self) -> None:
        if self._server is None:
            return  # never bound: the socket file (if any) is not ours
        self._server.close()
        await self._server.wait_closed()
        self._server = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    line = await reader.readline()
                except (asyncio.LimitOverrunError, ValueError):
                    writer.write(protocol.encode(protocol.error(f"message longer than {protocol.MAX_LINE} bytes")))
                    break
                if not line:
                    break
                if not line.strip():
                    continue
                try:
                    reply = await self.handler(protocol.parse_request(line))
                except protocol.ProtocolError as exc:
                    reply = protocol.error(str(exc))
                except Exception as exc:  # a bug must not kill the socket for the next CNI call
                    log.exception("enrollment request failed")
                    reply = protocol.error(f"internal error: {exc}")
                writer.write(protocol.encode(reply))
                await writer.drain()
        except (ConnectionResetError, BrokenPipeError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionResetError, BrokenPipeError):
                await writer.wait_closed()


class AgentClient:
    """Blocking client of the enrollment socket (CLI, CNI plugin)."""

    def __init__(self, path: Path, state_dir: Path | None = None, timeout: float = 10.0) -> None:
        self.path = path
        self.state_dir = state_dir if state_dir is not None else path.parent
        self.timeout = timeout

    def call(self, message: dict[str, Any]) -> dict[str, Any]:
        hint = f"no agent at {self.path}: is `nodeagent run` running with --state-dir {self.state_dir}?"
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(self.timeout)
            try:
                sock.connect(str(self.path))
            except (FileNotFoundError, ConnectionRefusedError):
                raise AgentNotRunning(hint) from None
            except PermissionError:
                raise AgentNotRunning(f"permission denied on {self.path}: run as the agent's user (root)") from None
            try:
                sock.sendall(protocol.encode(message))
                reply = _read_line(sock)
            except socket.timeout:
                raise AgentNotRunning(f"the agent at {self.path} did not answer within {self.timeout:g}s") from None
            except (ConnectionResetError, BrokenPipeError):
                raise AgentNotRunning(f"the agent at {self.path} closed the connection; see its log") from None
        if not reply:
            raise AgentNotRunning(f"the agent at {self.path} closed the connection without a reply; see its log")
        try:
            return protocol.decode(reply, limit=None)
        except protocol.ProtocolError as exc:
            raise AgentNotRunning(f"the agent at {self.path} sent a bad reply: {exc}") from None


def _read_line(sock: socket.socket) -> bytes:
    chunks: list[bytes] = []
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        if b"\n" in chunk:
            return b"".join(chunks).split(b"\n", 1)[0]
