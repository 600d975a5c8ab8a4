"""The CA service (``nodeagent ca serve``): HTTPS over TLS 1.3, mutual TLS with
node credentials, placement-checked signing.

Endpoints (every one needs a node credential, ``spiffe://<td>/node/<name>``):

- ``POST /v1/certificates`` ``{"identity": "spiffe://...", "csr": "<PEM>", "lifetime_seconds": N}``
  -> 200 ``{"certificate", "chain", "serial", "not_after"}``; 403 ``{"error"}`` when the
  registry does not place the identity on the calling node (or it is revoked); 400 for a
  bad request.
- ``GET /v1/trust-bundle`` -> the roots, PEM, the signing root first.
- ``GET /v1/revocations`` -> ``{"version", "serials", "identities"}``.
"""
from __future__ import annotations

import ipaddress
import json
import logging
import ssl
import time
from typing import Callable

from aiohttp import web
from cryptography import x509

from . import certs
from .ca import CADirectory, LocalCA
from .errors import CAError, SigningRefused
from .tls import tls13_context, load_cert_chain_in_memory, reloading_server_context

log = logging.getLogger(__name__)

SERVING_LIFETIME = 30 * 24 * 3600.0
MAX_BODY = 64 * 1024


class _Refused(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class CAServer:
    def __init__(self, directory: CADirectory, *, host: str = "127.0.0.1", port: int = 0,
                 hostnames: tuple[str, ...] = (), clock: Callable[[], float] = time.time):
        self.directory = directory
        self.host = host
        self.port = port
        self.hostnames = tuple(dict.fromkeys((host, "localhost", *hostnames)))
        self._clock = clock
        self._ca = LocalCA(directory, clock=clock)
        self._serving: tuple[str, float, ssl.SSLContext] | None = None
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"https://{host}:{self.port}"

    # ---- TLS ------------------------------------------------------------------------

    def _serving_context(self) -> ssl.SSLContext:
        """Current server context: client certificates checked against every root
        of the bundle; the serving certificate comes from the OLDEST root, the one
        every agent already trusts while a new root is being rolled out."""
        now = self._clock()
        bundle = self.directory.trust_bundle(now)
        if self._serving and self._serving[0] == bundle.version and now < self._serving[1]:
            return self._serving[2]
        key = certs.generate_key()
        dns, ips = [], []
        for name in self.hostnames:
            (ips if _is_ip(name) else dns).append(name)
        request = certs.LeafRequest(None, key.public_key(), now - certs.CLOCK_SKEW_ALLOWANCE,
                                    now + SERVING_LIFETIME, tuple(dns), tuple(ips))
        oldest = min(self.directory.roots(), key=lambda r: r.created)
        issued = self.directory.sign(request, kind="serving", node=None, now=now, root=oldest)
        ctx = tls13_context(True, bundle.pem)
        load_cert_chain_in_memory(ctx, certs.certs_to_pem((issued.certificate, *issued.chain)),
                                  certs.key_to_pem(key))
        self._serving = (bundle.version, now + SERVING_LIFETIME / 2, ctx)
        return ctx

    # ---- lifecycle ------------------------------------------------------------------

    async def start(self) -> None:
        app = web.Application(client_max_size=MAX_BODY)
        app.router.add_post("/v1/certificates", self._sign)
        app.router.add_get("/v1/trust-bundle", self._bundle)
        app.router.add_get("/v1/revocations", self._revocations)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port,
                           ssl_context=reloading_server_context(self._serving_context))
        await site.start()
        self.port = self._runner.addresses[0][1]
        log.info("CA service for trust domain %s listening on %s", self.directory.trust_domain, self.url)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # ---- handlers -------------------------------------------------------------------

    def _node_of(self, request: web.Request) -> str:
        """The node name of the caller's credential, after checking that the
        credential's root is still in the bundle and that it is not revoked."""
        ssl_object = request.transport.get_extra_info("ssl_object") if request.transport else None
        der = ssl_object.getpeercert(binary_form=True) if ssl_object else None
        if not der:
            raise _Refused(401, "a node credential (client certificate) is required")
        cert = x509.load_der_x509_certificate(der)
        try:
            identity = certs.spiffe_id_of(cert)
        except certs.CertificateError as exc:
            raise _Refused(403, f"client certificate: {exc}") from None
        td = self.directory.trust_domain
        if identity.trust_domain != td or identity.node is None:
            raise _Refused(403, f"{identity} is not a node credential of trust domain {td}")
        if self.directory.trust_bundle(self._clock()).issuer_of(cert) is None:
            raise _Refused(403, f"the credential of node {identity.node} was signed by a retired root; "
                                "issue a new one with `nodeagent ca node-credential`")
        reason = self.directory.revocation_list().revoked_reason(cert)
        if reason:
            raise _Refused(403, f"node credential refused: {reason}")
        return identity.node

    async def _sign(self, request: web.Request) -> web.Response:
        try:
            node = self._node_of(request)
            try:
                body = await request.json()
            except (ValueError, UnicodeDecodeError):
                raise _Refused(400, "request body must be JSON {\"identity\", \"csr\"}") from None
            if not isinstance(body, dict) or not isinstance(body.get("identity"), str) \
                    or not isinstance(body.get("csr"), str):
                raise _Refused(400, "request must have string fields \"identity\" and \"csr\" (PEM)")
            lifetime = body.get("lifetime_seconds")
            if lifetime is not None and (not isinstance(lifetime, (int, float)) or lifetime <= 0):
                raise _Refused(400, "\"lifetime_seconds\" must be a positive number")
            issued = self._ca.sign_csr(body["csr"].encode(), body["identity"], lifetime, node=node)
        except _Refused as exc:
            return _error(exc.status, str(exc))
        except SigningRefused as exc:
            log.warning("CA: refused %s for node %s: %s", body.get("identity"), node, exc)
            return _error(403, str(exc))
        except CAError as exc:
            return _error(400, str(exc))
        return web.json_response({
            "certificate": certs.cert_to_pem(issued.certificate).decode(),
            "chain": certs.certs_to_pem(issued.chain).decode(),
            "serial": certs.serial_hex(issued.serial),
            "not_after": issued.not_after,
        })

    async def _bundle(self, request: web.Request) -> web.Response:
        try:
            self._node_of(request)
        except _Refused as exc:
            return _error(exc.status, str(exc))
        return web.Response(body=self.directory.trust_bundle(self._clock()).pem,
                            content_type="application/x-pem-file")

    async def _revocations(self, request: web.Request) -> web.Response:
        try:
            self._node_of(request)
        except _Refused as exc:
            return _error(exc.status, str(exc))
        return web.json_response(self.directory.revocation_list().to_json())


def _error(status: int, message: str) -> web.Response:
    return web.Response(status=status, text=json.dumps({"error": message}),
                        content_type="application/json")


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True
