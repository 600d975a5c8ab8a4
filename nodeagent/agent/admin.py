"""The agent's HTTP faces (``nodeagent.httpd``), each a thin view over the agent:

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
import os
from types import MappingProxyType
from typing import Any, Callable, Mapping, Protocol

from nodeagent.httpd import HttpServer, Response, Route, json_response


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


def _json(data: Any, status: int = 200) -> Response:
    return json_response(to_jsonable(data), status)


def _view(fn: Callable[[], Any]) -> Route:
    # an exception is logged and answered 500 {"error": ...} by the server
    return lambda: _json(fn())


def admin_routes(view: AdminView) -> dict[str, Route]:
    paths = {
        "/workloads": view.workloads_view,
        "/config_dump": view.config_dump_view,
        "/certs": view.certs_view,
        "/endpoints": view.endpoints_view,
        "/healthz": view.health_view,
    }
    routes = {path: _view(fn) for path, fn in paths.items()}
    index = {"paths": sorted(paths)}
    routes["/"] = lambda: _json(index)
    return routes


def readiness_routes(view: AdminView) -> dict[str, Route]:
    def ready() -> Response:
        is_ready, detail = view.readiness_view()
        return _json(detail, status=200 if is_ready else 503)

    return {"/healthz/ready": ready}


def metrics_routes(view: AdminView) -> dict[str, Route]:
    def metrics() -> Response:
        body, content_type = view.metrics_text()
        return 200, content_type, body

    return {"/metrics": metrics, "/stats/prometheus": metrics}


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
    """One of the agent's HTTP servers (``name`` is its command-line flag)."""

    def __init__(self, name: str, routes: dict[str, Route], host: str, port: int) -> None:
        self.name = name
        self.server = HttpServer(routes, host, port, name=name)

    @property
    def host(self) -> str:
        return self.server.host

    @property
    def port(self) -> int:
        return self.server.port

    async def start(self) -> None:
        try:
            await self.server.start()
        except OSError as exc:
            reason = os.strerror(exc.errno) if exc.errno else str(exc)
            raise OSError(f"{self.name} cannot listen on {self.host}:{self.port}: {reason} "
                          f"(choose another address with --{self.name})") from None

    async def close(self) -> None:
        await self.server.close()
