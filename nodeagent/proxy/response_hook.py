"""Per-request response headers that depend on the request: CORS and generated hash cookies.

A ``ForwardPlan`` carries a ``ResponseHook`` only when its route has a
``corsPolicy`` or its cluster hashes on a cookie with a ``ttl``
(``ProxyRuntime._forward``); every other plan has ``response_hook = None`` and
the engines test nothing else. The decisions are ``policy.cors`` and
``policy.lb``'s; this module only reads the request and writes header bytes for
the HTTP/1.1 engine (``nodeagent.proxy.http``) and the HTTP/2 one
(``nodeagent.proxy.h2``).
"""
from __future__ import annotations

from policy import cors as cors_mod
from policy import lb as lb_mod

_CORS_NAMES = frozenset(n.encode() for n in cors_mod.RESPONSE_HEADER_NAMES)


def _cors_pairs(cors, exchange) -> list:
    origin = exchange.header_map().get("origin")
    if not origin:
        return []
    return [(n.encode("latin-1"), v.encode("latin-1")) for n, v in cors_mod.response_headers(cors, origin)]


class ResponseHook:
    """``cors``: the route's ``policy.cors.CorsConfig`` (or None); ``cookie``: the
    cluster's ``policy.cluster.HashPolicy`` when it is a cookie with a ``ttl`` (or None)."""

    __slots__ = ("cors", "cookie")

    def __init__(self, cors, cookie) -> None:
        self.cors = cors
        self.cookie = cookie

    def upstream_pairs(self, exchange) -> tuple[list, list]:
        """(CORS headers replacing the upstream's, headers appended) for an upstream response."""
        cors = _cors_pairs(self.cors, exchange) if self.cors is not None else []
        extra = []
        hp = self.cookie
        if hp is not None and lb_mod.cookie_to_generate(hp, exchange.header_map()):
            peer = exchange.down.peer
            value = lb_mod.generated_cookie_value(peer.remote, peer.local)
            extra.append((b"set-cookie", lb_mod.set_cookie_value(
                hp.name, value, hp.cookie_path, hp.cookie_ttl).encode("latin-1")))
        return cors, extra

    def h1(self, exchange, parts: list) -> None:
        """Edit an HTTP/1.1 response head in place: ``parts`` is the status line then
        (name, b": ", value, b"\\r\\n") groups (``Exchange.upstream_head``)."""
        cors, extra = self.upstream_pairs(exchange)
        if cors:
            kept = [parts[0]]
            for i in range(1, len(parts), 4):
                if parts[i].lower() not in _CORS_NAMES:
                    kept += parts[i:i + 4]
            parts[:] = kept
        for name, value in cors + extra:
            parts += (name, b": ", value, b"\r\n")

    def h2(self, exchange, headers: list) -> list:
        """An HTTP/2 response's (lower-case name, value) list with the hook's headers."""
        cors, extra = self.upstream_pairs(exchange)
        if cors:
            headers = [h for h in headers if h[0] not in _CORS_NAMES]
        return headers + cors + extra if cors or extra else headers

    def local(self, exchange) -> list:
        """Headers for a local reply (503 UH/UF/UO, 504 UT, 408 SI...) produced after the
        CORS filter ran: Envoy's CORS encodeHeaders adds its headers to those too. No
        cookie: Envoy adds generated cookies to upstream responses only."""
        return _cors_pairs(self.cors, exchange) if self.cors is not None else []


def wants_cors_headers(reply) -> bool:
    """Whether a local reply passes through the CORS filter's encode path with the
    request marked as CORS: not a fault abort (``FI``: the fault filter runs before the
    CORS filter in Istio's chain) and not one of the replies without flags (a preflight
    answer, which has its own headers, or an internal error)."""
    return reply.flags != "-" and reply.flags != "FI"


def preflight_reply(cors, exchange, local_reply_class):
    """The local answer to a CORS preflight on a route with ``cors``, or None."""
    answer = cors_mod.preflight(cors, exchange.method.decode("latin-1"), exchange.header_map())
    if answer is None:
        return None
    return local_reply_class(200, "-", b"", [(n.encode("latin-1"), v.encode("latin-1")) for n, v in answer])
