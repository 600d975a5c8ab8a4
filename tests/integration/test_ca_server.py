"""The CA service for several nodes: a real `CAServer` on 127.0.0.1:0, node
credentials over mutual TLS, the placement registry as the authority, and the
certificate manager when the CA goes away and comes back."""
from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import ssl
import threading
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from nodeagent.cli import UserError
from nodeagent.commands import ca as ca_command
from nodeagent.identity import certs
from nodeagent.identity.ca import CADirectory, issue_node_credential
from nodeagent.identity.client import HttpsCAClient
from nodeagent.identity.errors import CAError, CAUnavailable, SigningRefused
from nodeagent.identity.manager import CertificateManager
from nodeagent.identity.server import CAServer
from nodeagent.identity.spiffe import SpiffeId

WEB = SpiffeId.workload("shop", "web")   # placed on n1
DB = SpiffeId.workload("shop", "db")     # placed on n2
CART = SpiffeId.workload("shop", "cart")  # placed nowhere


def cli(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    ca_command.register(parser.add_subparsers())
    args = parser.parse_args(["ca", *argv])
    return args.func(args)


class ServerThread:
    """A CAServer on its own event loop in a thread, so tests can use asyncio.run freely."""

    def __init__(self, directory: CADirectory, port: int = 0):
        self.loop = asyncio.new_event_loop()
        self.server = CAServer(directory, port=port)
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(10)

    @property
    def url(self) -> str:
        return self.server.url

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    base = tmp_path_factory.mktemp("ca-service")
    directory = CADirectory.init(base / "ca")
    for node, identity in (("n1", WEB), ("n2", DB)):
        issue_node_credential(directory, node, base / node)
        directory.place(node, identity.namespace, identity.service_account)
    server = ServerThread(directory)
    yield directory, server, base
    server.stop()


@pytest.fixture(scope="module")
def key():
    return certs.generate_key()


def post(url: str, cred: Path | None, path: str, payload: dict) -> tuple[int, dict]:
    """A plain HTTPS client (http.client + ssl), independent of HttpsCAClient."""
    ctx = ssl.create_default_context(cafile=str(cred / "ca-roots.pem" if cred else None))
    if cred is not None:
        ctx.load_cert_chain(cred / "node.pem", cred / "node.key")
    host, port = url.removeprefix("https://").rsplit(":", 1)
    conn = http.client.HTTPSConnection(host, int(port), context=ctx, timeout=10)
    try:
        conn.request("POST", path, body=json.dumps(payload), headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def test_node_obtains_its_placed_identity(env, key):
    directory, server, base = env
    client = HttpsCAClient(server.url, base / "n1")
    issued = asyncio.run(client.sign(certs.make_csr(key, WEB), WEB, 3600))
    assert issued.identity == WEB
    assert certs.public_keys_equal(issued.certificate.public_key(), key.public_key())
    assert certs.issued_by(issued.certificate, directory.roots()[0].certificate)
    assert issued.not_after - issued.not_before == 3600 + certs.CLOCK_SKEW_ALLOWANCE
    logged = [e for e in directory.issued() if e["serial"] == certs.serial_hex(issued.serial)]
    assert logged == [dict(logged[0], node="n1", identity=WEB.uri, kind="workload")]


def test_stolen_node_credential_cannot_mint_another_nodes_identity(env, key):
    _, server, base = env
    status, body = post(server.url, base / "n2", "/v1/certificates",
                        {"identity": WEB.uri, "csr": certs.make_csr(key, WEB).decode()})
    assert status == 403
    assert body["error"].startswith("the registry does not place shop/web on node n2")
    client = HttpsCAClient(server.url, base / "n2")
    with pytest.raises(SigningRefused, match=r"HTTP 403.*does not place shop/web on node n2"):
        asyncio.run(client.sign(certs.make_csr(key, WEB), WEB, 3600))
    # The CSR's own SAN does not matter either: n2 asks for WEB with a CSR naming DB.
    status, body = post(server.url, base / "n2", "/v1/certificates",
                        {"identity": WEB.uri, "csr": certs.make_csr(key, DB).decode()})
    assert status == 403


def test_unplaced_identity_refused_until_placed_and_after_unplaced(env, key):
    directory, server, base = env
    client = HttpsCAClient(server.url, base / "n1")
    csr = certs.make_csr(key, CART)
    with pytest.raises(SigningRefused, match="does not place shop/cart on node n1"):
        asyncio.run(client.sign(csr, CART, 3600))
    d = str(directory.path)
    cli("place", "--dir", d, "--node", "n1", "--namespace", "shop", "--service-account", "cart")
    assert asyncio.run(client.sign(csr, CART, 3600)).identity == CART  # no restart needed
    cli("unplace", "--dir", d, "--node", "n1", "--namespace", "shop", "--service-account", "cart")
    with pytest.raises(SigningRefused):
        asyncio.run(client.sign(csr, CART, 3600))


def test_bad_requests_get_400_with_reason(env, key):
    _, server, base = env
    csr = bytearray(x509.load_pem_x509_csr(certs.make_csr(key, WEB)).public_bytes(serialization.Encoding.DER))
    csr[-5] ^= 1
    tampered = x509.load_der_x509_csr(bytes(csr)).public_bytes(serialization.Encoding.PEM).decode()
    status, body = post(server.url, base / "n1", "/v1/certificates", {"identity": WEB.uri, "csr": tampered})
    assert (status, body["error"].startswith("bad CSR: CSR signature does not verify")) == (400, True)
    status, body = post(server.url, base / "n1", "/v1/certificates", {"identity": WEB.uri})
    assert status == 400 and "csr" in body["error"]
    status, body = post(server.url, base / "n1", "/v1/certificates",
                        {"identity": "spiffe://other.org/ns/shop/sa/web", "csr": certs.make_csr(key, WEB).decode()})
    assert status == 403 and "outside this CA's trust domain" in body["error"]


def test_no_client_certificate_no_service(env):
    _, server, base = env
    ctx = ssl.create_default_context(cafile=str(base / "n1" / "ca-roots.pem"))
    host, port = server.url.removeprefix("https://").rsplit(":", 1)


    def get() -> int:
        conn = http.client.HTTPSConnection(host, int(port), context=ctx, timeout=10)
        try:
            conn.request("GET", "/v1/trust-bundle")
            return conn.getresponse().status
        finally:
            conn.close()

    with pytest.raises((ssl.SSLError, ConnectionError)):
        get()
    ctx.load_cert_chain(base / "n1" / "node.pem", base / "n1" / "node.key")
    assert get() == 200  # the same client with its node credential is served


def test_revoked_node_credential_is_refused(env, key, tmp_path):
    directory, server, _ = env
    issued = issue_node_credential(directory, "n1", tmp_path / "n1-copy")
    client = HttpsCAClient(server.url, tmp_path / "n1-copy")
    assert asyncio.run(client.sign(certs.make_csr(key, WEB), WEB, 3600)).identity == WEB
    directory.revoke_serial(issued.serial)
    with pytest.raises(SigningRefused, match="node credential refused: certificate serial .* is revoked"):
        asyncio.run(client.sign(certs.make_csr(key, WEB), WEB, 3600))


def test_trust_bundle_and_revocation_endpoints(env):
    directory, server, base = env
    client = HttpsCAClient(server.url, base / "n2")
    bundle = asyncio.run(client.trust_bundle())
    assert bundle.roots == directory.trust_bundle(time.time()).roots
    rl = asyncio.run(client.revocation_list())
    assert rl == directory.revocation_list()


def test_client_refuses_bad_credential_dirs(tmp_path, env):
    _, server, base = env
    with pytest.raises(CAError, match="node.key is missing"):
        HttpsCAClient(server.url, tmp_path)
    with pytest.raises(CAError, match="https://HOST:PORT"):
        HttpsCAClient("http://127.0.0.1:1", base / "n1")
    loose = tmp_path / "loose"
    loose.mkdir()
    for name in ("node.key", "node.pem", "ca-roots.pem"):
        (loose / name).write_bytes((base / "n1" / name).read_bytes())
    os.chmod(loose / "node.key", 0o644)
    with pytest.raises(CAError, match="chmod 600"):
        HttpsCAClient(server.url, loose)


class FakeClock:
    def __init__(self, now: float):
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_manager_rides_out_a_ca_outage(tmp_path):
    """The CA is stopped: renewal fails, retried after 60 s then 120 s, health is
    Degraded, the old certificate keeps serving; the CA comes back: renewed, OK."""
    directory = CADirectory.init(tmp_path / "ca")
    issue_node_credential(directory, "n1", tmp_path / "n1")
    directory.place("n1", "shop", "web")
    clock = FakeClock(time.time())

    server = ServerThread(directory)
    port = server.server.port
    manager = CertificateManager(HttpsCAClient(server.url, tmp_path / "n1", timeout=5),
                                 trust_domain="cluster.local", clock=clock)
    manager.add_workload(WEB)
    asyncio.run(manager.refresh())
    old = manager.certificate(WEB)
    assert manager.health().ok
    server.stop()

    clock.now = old.renew_at
    asyncio.run(manager.refresh())
    health = manager.health()
    assert health.status == "Degraded" and "unreachable" in health.reason
    assert manager.status()[0]["next_attempt"] == old.renew_at + 60
    assert manager.certificate(WEB).serial == old.serial
    clock.now = old.renew_at + 60
    asyncio.run(manager.refresh())
    assert manager.status()[0]["next_attempt"] == old.renew_at + 60 + 120
    assert manager.status()[0]["failures"] == 2
    assert manager.certificate(WEB).serial == old.serial

    server = ServerThread(directory, port=port)  # back on the same address
    try:
        clock.now = old.renew_at + 180
        asyncio.run(manager.refresh())
        assert manager.certificate(WEB).serial != old.serial
        assert manager.health().ok, manager.health().reason
    finally:
        server.stop()


def test_unreachable_ca_is_reported_as_such(tmp_path, env):
    _, server, base = env
    client = HttpsCAClient("https://127.0.0.1:9", base / "n1", timeout=2)
    with pytest.raises(CAUnavailable, match="CA at https://127.0.0.1:9 unreachable"):
        asyncio.run(client.trust_bundle())


def test_root_rotation_does_not_cut_agents_off(tmp_path, key):
    directory = CADirectory.init(tmp_path / "ca")
    issue_node_credential(directory, "n1", tmp_path / "n1")
    directory.place("n1", "shop", "web")
    server = ServerThread(directory)
    try:
        client = HttpsCAClient(server.url, tmp_path / "n1")
        old_root = directory.roots()[0].certificate
        new_root = directory.rotate_root(now=time.time()).certificate
        # The agent knows only the old root; the service still presents a
        # certificate from it, and the bundle it fetches adds the new one.
        bundle = asyncio.run(client.trust_bundle())
        assert bundle.roots == (new_root, old_root)
        assert certs.load_certs((tmp_path / "n1" / "ca-roots.pem").read_bytes()) == bundle.roots
        issued = asyncio.run(client.sign(certs.make_csr(key, WEB), WEB, 3600))
        assert certs.issued_by(issued.certificate, new_root)
        # A credential from the new root is accepted right away.
        issue_node_credential(directory, "n1", tmp_path / "n1-new")
        fresh = HttpsCAClient(server.url, tmp_path / "n1-new")
        assert asyncio.run(fresh.sign(certs.make_csr(key, WEB), WEB, 3600)).identity == WEB
        directory.retire_root(now=time.time(), force=True)
        assert asyncio.run(fresh.trust_bundle()).roots == (new_root,)
        # The old credential's root is gone: refused (at TLS or with a reason).
        with pytest.raises(CAError):
            asyncio.run(client.sign(certs.make_csr(key, WEB), WEB, 3600))
    finally:
        server.stop()


SERVE = """
import argparse, sys
from nodeagent.cli import UserError
from nodeagent.commands import ca
parser = argparse.ArgumentParser()
ca.register(parser.add_subparsers())
args = parser.parse_args(sys.argv[1:])
try:
    sys.exit(args.func(args))
except UserError as exc:
    print(f"nodeagent: {exc}", file=sys.stderr)
    sys.exit(1)
"""


def test_ca_serve_command_runs_and_stops_on_sigterm(tmp_path):
    import signal
    import subprocess
    import sys
    directory = CADirectory.init(tmp_path / "ca")
    issue_node_credential(directory, "n1", tmp_path / "n1")
    proc = subprocess.Popen([sys.executable, "-c", SERVE, "ca", "serve", "--dir", str(tmp_path / "ca"),
                             "--listen", "127.0.0.1:0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=Path(__file__).resolve().parents[2])
    try:
        line = proc.stdout.readline()
        assert line.startswith("CA service for cluster.local on https://127.0.0.1:"), proc.stderr.read()
        url = line.split()[-1]
        bundle = asyncio.run(HttpsCAClient(url, tmp_path / "n1").trust_bundle())
        assert bundle.roots == directory.trust_bundle(time.time()).roots
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        assert "PRIVATE KEY" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    with pytest.raises(UserError, match="--listen 'nowhere': expected ADDR:PORT"):
        cli("serve", "--dir", str(tmp_path / "ca"), "--listen", "nowhere")


def test_create_manager_in_remote_mode(env):
    from nodeagent.identity import create_manager
    _, server, base = env
    manager = create_manager(ca_url=server.url, credential_dir=base / "n1")
    manager.add_workload(WEB)
    asyncio.run(manager.refresh())
    assert manager.health().ok
    assert certs.spiffe_id_of(manager.certificate(WEB).certificate) == WEB
    with pytest.raises(CAError, match="is for trust domain cluster.local, but example.org is configured"):
        create_manager(ca_url=server.url, credential_dir=base / "n1", trust_domain="example.org")
    with pytest.raises(CAError, match="needs the node credential directory"):
        create_manager(ca_url=server.url)
