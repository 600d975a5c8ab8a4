"""The agent's side of the CA service: ``HttpsCAClient`` (a ``CAClient``).

It authenticates with the node credential (``node.key``/``node.pem``, made by
``nodeagent ca node-credential``) and verifies the CA's serving certificate
against ``ca-roots.pem`` plus every root later fetched from the CA itself (so a
root rotation does not cut the agent off; the fetched bundle is written back to
``ca-roots.pem``). The private keys of workloads never leave this process:
only CSRs are sent.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import ssl
from pathlib import Path
from urllib.parse import urlsplit

from nodeagent import httpd

from . import certs
from .ca import NODE_CERT_FILE, NODE_KEY_FILE, ROOTS_FILE, write_file_atomic
from .errors import CAError, CAUnavailable, SigningRefused
from .spiffe import SpiffeId
from .trust import IssuedCertificate, RevocationList, TrustBundle

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 10.0


class HttpsCAClient:
    def __init__(self, url: str, credential_dir: str | os.PathLike, *, timeout: float = DEFAULT_TIMEOUT):
        parts = urlsplit(url)
        if parts.scheme != "https" or not parts.hostname:
            raise CAError(f"CA URL {url!r} must look like https://HOST:PORT")
        self.url = url.rstrip("/")
        self._host, self._port = parts.hostname, parts.port or 443
        self._base = parts.path.rstrip("/")
        self.credential_dir = Path(credential_dir)
        self.timeout = timeout
        key_file = self.credential_dir / NODE_KEY_FILE
        cert_file = self.credential_dir / NODE_CERT_FILE
        roots_file = self.credential_dir / ROOTS_FILE
        for file in (key_file, cert_file, roots_file):
            if not file.is_file():
                raise CAError(f"{file} is missing; copy the node credential made by "
                              "`nodeagent ca node-credential` into this directory")
        if os.stat(key_file).st_mode & 0o077:
            raise CAError(f"{key_file} is readable by other users; run `chmod 600 {key_file}`")
        self._key_file, self._cert_file, self._roots_file = key_file, cert_file, roots_file
        try:
            node_cert = certs.load_certs(cert_file.read_bytes())[0]
            self.node_identity: SpiffeId = certs.spiffe_id_of(node_cert)
            self._roots = TrustBundle.from_pem(roots_file.read_bytes())
        except (certs.CertificateError, IndexError) as exc:
            raise CAError(f"{cert_file}: not a node credential ({exc})") from None
        if self.node_identity.node is None:
            raise CAError(f"{cert_file} holds {self.node_identity}, not a node identity")
        self._ctx: tuple[str, ssl.SSLContext] | None = None

    @property
    def trust_domain(self) -> str:
        return self.node_identity.trust_domain

    def _context(self) -> ssl.SSLContext:
        if self._ctx is None or self._ctx[0] != self._roots.version:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_3
            ctx.load_verify_locations(cadata=self._roots.pem.decode("ascii"))
            try:
                ctx.load_cert_chain(self._cert_file, self._key_file)
            except (ssl.SSLError, OSError) as exc:
                raise CAError(f"cannot load the node credential from {self.credential_dir}: "
                              f"{exc.__class__.__name__}") from None
            self._ctx = (self._roots.version, ctx)
        return self._ctx[1]

    async def _request(self, method: str, path: str, payload: dict | None = None) -> tuple[int, bytes]:
        body = json.dumps(payload).encode() if payload is not None else b""
        try:
            resp = await httpd.request(method, self._host, self._port, self._base + path, body=body,
                                       ssl=self._context(), timeout=self.timeout)
        except (httpd.HttpClientError, asyncio.TimeoutError, ssl.SSLError, OSError) as exc:
            detail = str(exc) or exc.__class__.__name__
            raise CAUnavailable(f"CA at {self.url} unreachable: {detail}") from None
        return resp.status, resp.body

    @staticmethod
    def _error_of(status: int, body: bytes) -> str:
        try:
            return str(json.loads(body)["error"])
        except (ValueError, KeyError, TypeError):
            return body[:200].decode("utf-8", "replace") or f"HTTP {status}"

    def _check(self, status: int, body: bytes) -> None:
        if status == 200:
            return
        message = f"CA at {self.url} refused (HTTP {status}): {self._error_of(status, body)}"
        if status == 403:
            raise SigningRefused(message)
        if status >= 500:
            raise CAUnavailable(message)
        raise CAError(message)

    async def sign(self, csr_pem: bytes, identity: SpiffeId, lifetime: float) -> IssuedCertificate:
        status, body = await self._request("POST", "/v1/certificates", {
            "identity": identity.uri, "csr": csr_pem.decode("ascii"), "lifetime_seconds": lifetime})
        self._check(status, body)
        try:
            data = json.loads(body)
            cert = certs.load_certs(data["certificate"].encode())[0]
            chain = certs.load_certs(data["chain"].encode())
        except (ValueError, KeyError, TypeError, IndexError, certs.CertificateError) as exc:
            raise CAError(f"CA at {self.url} sent an unreadable certificate ({exc})") from None
        return IssuedCertificate(cert, chain)

    async def trust_bundle(self) -> TrustBundle:
        status, body = await self._request("GET", "/v1/trust-bundle")
        self._check(status, body)
        bundle = TrustBundle.from_pem(body)
        if bundle.version != self._roots.version:
            # Fetched over the authenticated channel: it replaces the bootstrap roots
            # for the next connections (and after a restart).
            self._roots = bundle
            try:
                write_file_atomic(self._roots_file, bundle.pem, 0o644)
            except OSError as exc:
                log.warning("identity: cannot update %s: %s", self._roots_file, exc)
        return bundle

    async def revocation_list(self) -> RevocationList:
        status, body = await self._request("GET", "/v1/revocations")
        self._check(status, body)
        return RevocationList.from_bytes(body, f"revocation list from {self.url}")
