"""The agent's HTTP faces (aiohttp), each a thin view over the agent:

- admin (localhost, :15000): ``/workloads``, ``/config_dump``, ``/certs``,
  ``/endpoints``, ``/healthz``;
- metrics (:15020): ``/metrics`` (``/stats/prometheus`` too, as Istio);
- readiness (:15021): ``/healthz/ready``, 200 once the agent is ready, 503
  with the missing conditions before.
"""
from __future__ import annotations

import dataclasses
import enum
import ipaddress
import json
import logging
import os
from types import MappingProxyType
from typing import Any, Callable, Mapping, Protocol

from aiohttp import web

log = logging.getLogger("nodeagent.agent.admin")


class AdminView(Protocol):
    """What the agent shows; each returns plain JSON-able data."""

    def workloads_view(self) -> dict[str, Any]: ...

    def config_dump_view(self) -> dict[str, Any]: ...

    def certs_view(self) -> dict[str, Any]: ...

    def endpoints_view(self) -> dict[str, Any]: ...

    def health_view(self) -> dict[str, Any]: ...

    def readiness_view(self) -> tuple[bool, dict[str, Any]]: ...

    def metrics_text(self) -> tuple[bytes, str]: ...


def to_jsonable(value: Any) -> Any:
    """Frozen dataclasses, read-only mappings, tuples, enums -> plain JSON values."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)
                if not f.name.startswith("_")}
    if isinstance(value, (dict, MappingProxyType, Mapping)):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        items = [to_jsonable(v) for v in value]
        return sorted(items, key=json.dumps) if isinstance(value, (set, frozenset)) else items
    if isinstance(value, enum.Enum):
        return to_jsonable(value.value)
    if isinstance(value, (ipaddress.IPv4Address, ipaddress.IPv6Address, ipaddress.IPv4Network, ipaddress.IPv6Network)):
        return str(value)
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(text=json.dumps(to_jsonable(data), indent=2, sort_keys=True) + "\n",
                        status=status, content_type="application/json")


def _view(fn: Callable[[], Any]):
    async def handler(request: web.Request) -> web.Response:
        try:
            return _json(fn())
        except Exception as exc:  # the admin API reports, it must not die
            log.exception("admin %s failed", request.path)
            return _json({"error": f"{request.path}: {exc}"}, status=500)
    return handler


def admin_app(view: AdminView) -> web.Application:
    app = web.Application()
    paths = {
        "/workloads": view.workloads_view,
        "/config_dump": view.config_dump_view,
        "/certs": view.certs_view,
        "/endpoints": view.endpoints_view,
        "/healthz": view.health_view,
    }
    for path, fn in paths.items():
        app.router.add_get(path, _view(fn))

    async def index(request: web.Request) -> web.Response:
        return _json({"paths": sorted(paths)})

    app.router.add_get("/", index)
    return app


def readiness_app(view: AdminView) -> web.Application:
    app = web.Application()

    async def ready(request: web.Request) -> web.Response:
        is_ready, detail = view.readiness_view()
        return _json(detail, status=200 if is_ready else 503)

    app.router.add_get("/healthz/ready", ready)
    return app


def metrics_app(view: AdminView) -> web.Application:
    app = web.Application()

    async def metrics(request: web.Request) -> web.Response:
        body, content_type = view.metrics_text()
        return web.Response(body=body, headers={"Content-Type": content_type})

    app.router.add_get("/metrics", metrics)
    app.router.add_get("/stats/prometheus", metrics)
    return app


def parse_listen(text: str, flag: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[V6]:PORT`` -> (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{flag} must be HOST:PORT (e.g. 127.0.0.1:15000), got {text!r}")
    host = host.strip("[]") or "0.0.0.0"
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{flag}: {host!r} is not an IP address") from None
    return host, int(port)


class HttpFace:
    """One aiohttp app on one address."""

    def __init__(self, name: str, app: web.Application, host: str, port: int) -> None:
        self.name, self.app, self.host, self.port = name, app, host, port
        self.runner: web.AppRunner | None = None

    async def start(self) -> None:
        self.runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
        await self.runner.setup()
        site = web.TCPSite(self.runner, self.host, self.port, reuse_address=True)
        try:
            await site.start()
        except OSError as exc:
            await self.runner.cleanup()
            self.runner = None
            reason = os.strerror(exc.errno) if exc.errno else str(exc)
            raise OSError(f"{self.name} cannot listen on {self.host}:{self.port}: {reason} "
                          f"(choose another address with --{self.name})") from None
        sockets = site._server.sockets if site._server else ()  # the bound port when 0 was asked
        if sockets:
            self.port = sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None
