"""DestinationRule ``tls`` SIMPLE / MUTUAL: TLS origination through a real `nodeagent proxy`
to real TLS servers on loopback (Istio's "Egress TLS origination": the app sends plain HTTP,
the proxy opens TLS to the server).

What is checked, as Envoy/Istio behave:
- SIMPLE with caCertificates: 200; the server saw TLS, the SNI (the host, or tls.sni);
- an unknown CA, a hostname or subjectAltNames mismatch: 503 UF, and the server never
  received a plaintext byte nor a request; why is logged (INFO), once per cluster per minute;
- insecureSkipVerify; MUTUAL (client certificate presented; without it the server refuses);
- subset-level tls overriding the host level, portLevelSettings;
- the opaque TCP relay and HTTP/2 (gRPC over TLS with ALPN h2);
- outlier detection counts TLS failures as connect failures; retry on connect-failure;
- credentialName fails closed (503 UF) with a load warning naming file:line and field;
- DISABLE stays plaintext.
"""
from __future__ import annotations

import http.client
import socket
import time
from concurrent import futures

import grpc
import pytest

from tests.integration.istio_yaml import FRONTEND, NS, destination_rule, virtual_service
from tests.integration.proxy_harness import ProxyProcess
from tests.integration.tls_upstream import TestCA, TlsUpstream
from tests.integration.upstream import UpstreamServer


def ext_service(name: str, endpoints, *, port: int = 80, port_name: str = "http", protocol: str = "HTTP",
                labels=None, location: str = "MESH_EXTERNAL") -> str:
    """A ServiceEntry ``NAME.ext.test`` with static endpoints ((host, port) or (host, port, version))."""
    eps = []
    for ep in endpoints:
        version = ep[2] if len(ep) > 2 else "v1"
        eps.append(f"""  - address: {ep[0]}
    ports:
      {port_name}: {ep[1]}
    labels:
      version: {version}
""")
    return f"""---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: {name}
  namespace: {NS}
spec:
  hosts:
  - {name}.ext.test
  location: {location}
  resolution: STATIC
  ports:
  - number: {port}
    name: {port_name}
    protocol: {protocol}
  endpoints:
{"".join(eps)}"""


def vs(name: str, *, subset: str | None = None, retries: str = "    retries:\n      attempts: 0\n",
       port: int = 80) -> str:
    sub = f"\n        subset: {subset}" if subset else ""
    return virtual_service(name, f"{name}.ext.test", f"""  - route:
    - destination:
        host: {name}.ext.test
        port:
          number: {port}{sub}
{retries}""")


def dr(name: str, body: str) -> str:
    return destination_rule(name, f"{name}.ext.test", body)


def get(proxy, host: str, path: str = "/", timeout: float = 10.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"Host": host})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def flags_for(proxy, authority: str, count: int) -> list[str]:
    """The response flags of the access-log lines for ``authority`` once ``count`` are there."""
    def lines():
        return [l["response_flags"] for l in proxy.access_log() if l.get("authority") == authority]
    wait_for(lambda: len(lines()) >= count)
    return lines()


def wait_for(cond, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return cond()


class TlsGrpc:
    """A grpcio server of ``test.Echo/Which`` over TLS (ALPN h2, as grpcio requires)."""

    def __init__(self, name: str, cert, key) -> None:
        self.name = name
        self.hits = 0
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))

        def which(req, ctx):
            self.hits += 1
            return self.name.encode()

        handlers = {"Which": grpc.unary_unary_rpc_method_handler(which)}
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("test.Echo", handlers),))
        creds = grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())])
        self.port = self.server.add_secure_port("127.0.0.1:0", creds)
        self.server.start()

    def stop(self) -> None:
        self.server.stop(0)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("tls-origination")
    certs = d / "certs"
    certs.mkdir()
    ca, other_ca, client_ca = TestCA(certs, "good"), TestCA(certs, "other"), TestCA(certs, "clients")
    names = ["simple", "sni", "sans", "sanbad", "hostbad", "unknownca", "insecure", "mutual", "mutualmissing",
             "subset", "portlevel", "tcp", "outlier", "retried", "cred", "grpc", "revoked", "crlok", "crlother"]
    files = {n: ca.issue(n, dns=[f"{n}.ext.test", "alias.ext.test"]) for n in names}
    wrong_name = ca.issue("elsewhere", dns=["elsewhere.example"])
    rogue = other_ca.issue("rogue", dns=["outlier.ext.test", "retried.ext.test", "unknownca.ext.test",
                                         "insecure.ext.test", "subset.ext.test"])
    client_cert, client_key = client_ca.issue("frontend-client", dns=["frontend.shop"], client=True)
    up = {}
    for n in ("simple", "sni", "sans", "sanbad", "portlevel"):
        up[n] = TlsUpstream(n, *files[n]).start()
    up["hostbad"] = TlsUpstream("hostbad", *wrong_name).start()
    up["unknownca"] = TlsUpstream("unknownca", *rogue).start()
    up["insecure"] = TlsUpstream("insecure", *rogue).start()
    up["mutual"] = TlsUpstream("mutual", *files["mutual"], client_ca=client_ca.cert_file).start()
    up["mutualmissing"] = TlsUpstream("mutualmissing", *files["mutualmissing"], client_ca=client_ca.cert_file).start()
    up["subset-v1"] = TlsUpstream("subset-v1", *files["subset"]).start()
    up["subset-v2"] = TlsUpstream("subset-v2", *rogue).start()
    up["tcp"] = TlsUpstream("tcp", *files["tcp"], echo=True).start()
    up["tcpbad"] = TlsUpstream("tcpbad", *rogue, echo=True).start()
    up["outlier-good"] = TlsUpstream("outlier-good", *files["outlier"]).start()
    up["outlier-bad"] = TlsUpstream("outlier-bad", *rogue).start()
    up["retried-good"] = TlsUpstream("retried-good", *files["retried"]).start()
    up["retried-bad"] = TlsUpstream("retried-bad", *rogue).start()
    up["cred"] = TlsUpstream("cred", *files["cred"]).start()
    for n in ("revoked", "crlok", "crlother"):
        up[n] = TlsUpstream(n, *files[n]).start()
    crl = ca.crl([files["revoked"][0]])  # the good CA revokes the "revoked" server's certificate
    other_crl = other_ca.crl(name="crl-of-another-ca")  # nothing revoked, but not the chain's CA
    plain = UpstreamServer("plain").start()
    grpc_up = TlsGrpc("grpc-tls", *files["grpc"])
    grpc_bad = TlsGrpc("grpc-bad", *rogue)  # a certificate the configured CA did not sign
    cafile = ca.cert_file
    simple_tls = f"    tls:\n      mode: SIMPLE\n      caCertificates: {cafile}\n"
    cfg = [FRONTEND]
    cfg += [ext_service("simple", [up["simple"].address]), vs("simple"), dr("simple", "  trafficPolicy:\n" + simple_tls)]
    cfg += [ext_service("sni", [up["sni"].address]), vs("sni"),
            dr("sni", f"  trafficPolicy:\n    tls:\n      mode: SIMPLE\n      caCertificates: {cafile}\n"
                      "      sni: alias.ext.test\n")]
    cfg += [ext_service("sans", [up["sans"].address]), vs("sans"),
            dr("sans", f"  trafficPolicy:\n    tls:\n      mode: SIMPLE\n      caCertificates: {cafile}\n"
                       "      subjectAltNames:\n      - nothing.example\n      - alias.ext.test\n")]
    cfg += [ext_service("sanbad", [up["sanbad"].address]), vs("sanbad"),
            dr("sanbad", f"  trafficPolicy:\n    tls:\n      mode: SIMPLE\n      caCertificates: {cafile}\n"
                         "      subjectAltNames:\n      - nothing.example\n")]
    cfg += [ext_service("hostbad", [up["hostbad"].address]), vs("hostbad"), dr("hostbad", "  trafficPolicy:\n" + simple_tls)]
    cfg += [ext_service("unknownca", [up["unknownca"].address]), vs("unknownca"),
            dr("unknownca", "  trafficPolicy:\n" + simple_tls)]
    cfg += [ext_service("insecure", [up["insecure"].address]), vs("insecure"),
            dr("insecure", "  trafficPolicy:\n    tls:\n      mode: SIMPLE\n      insecureSkipVerify: true\n")]
    cfg += [ext_service("mutual", [up["mutual"].address]), vs("mutual"),
            dr("mutual", f"  trafficPolicy:\n    tls:\n      mode: MUTUAL\n      caCertificates: {cafile}\n"
                         f"      clientCertificate: {client_cert}\n      privateKey: {client_key}\n")]
    cfg += [ext_service("mutualmissing", [up["mutualmissing"].address]), vs("mutualmissing"),
            dr("mutualmissing", "  trafficPolicy:\n" + simple_tls)]
    # host level: a CA that signed neither server; subset v1 overrides it with the right one
    cfg += [ext_service("subset", [up["subset-v1"].address + ("v1",), up["subset-v2"].address + ("v2",)]),
            vs("subset", subset="v1"),
            dr("subset", f"  trafficPolicy:\n    tls:\n      mode: SIMPLE\n      caCertificates: {other_ca.cert_file}\n"
                         "      sni: rogue.example\n"
                         "  subsets:\n  - name: v1\n    labels:\n      version: v1\n    trafficPolicy:\n"
                         f"      tls:\n        mode: SIMPLE\n        caCertificates: {cafile}\n"
                         "  - name: v2\n    labels:\n      version: v2\n")]
    # host level DISABLE, the port-level entry for port 80 originates TLS
    cfg += [ext_service("portlevel", [up["portlevel"].address]), vs("portlevel"),
            dr("portlevel", "  trafficPolicy:\n    tls:\n      mode: DISABLE\n    portLevelSettings:\n"
                            f"    - port:\n        number: 80\n      tls:\n        mode: SIMPLE\n"
                            f"        caCertificates: {cafile}\n")]
    cfg += [ext_service("tcp", [up["tcp"].address], port=5432, port_name="tcp", protocol="TCP"),
            dr("tcp", "  trafficPolicy:\n" + simple_tls)]
    cfg += [ext_service("tcpbad", [up["tcpbad"].address], port=5432, port_name="tcp", protocol="TCP"),
            dr("tcpbad", "  trafficPolicy:\n" + simple_tls)]
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))  # bound, never listening: connections to it are refused
    cfg += [ext_service("refused", [closed.getsockname()]), vs("refused"), dr("refused", "  trafficPolicy:\n" + simple_tls)]
    cfg += [ext_service("outlier", [up["outlier-bad"].address, up["outlier-good"].address]), vs("outlier"),
            dr("outlier", "  trafficPolicy:\n    loadBalancer:\n      simple: ROUND_ROBIN\n"
                          "    outlierDetection:\n      consecutive5xxErrors: 2\n      interval: 10s\n"
                          "      baseEjectionTime: 60s\n      maxEjectionPercent: 100\n" + simple_tls)]
    cfg += [ext_service("retried", [up["retried-bad"].address, up["retried-good"].address]),
            vs("retried", retries="    retries:\n      attempts: 2\n      retryOn: connect-failure\n"),
            dr("retried", "  trafficPolicy:\n    loadBalancer:\n      simple: ROUND_ROBIN\n" + simple_tls)]
    cfg += [ext_service("cred", [up["cred"].address]), vs("cred"),
            dr("cred", "  trafficPolicy:\n    tls:\n      mode: SIMPLE\n      credentialName: cred-secret\n")]
    for n, crl_file in (("revoked", crl), ("crlok", crl), ("crlother", other_crl)):
        cfg += [ext_service(n, [up[n].address]), vs(n),
                dr(n, f"  trafficPolicy:\n    tls:\n      mode: SIMPLE\n      caCertificates: {cafile}\n"
                      f"      caCrl: {crl_file}\n")]
    cfg += [ext_service("plain", [plain.address]), vs("plain"), dr("plain", "  trafficPolicy:\n    tls:\n      mode: DISABLE\n")]
    cfg += [ext_service("grpc", [("127.0.0.1", grpc_up.port)], port=8080, port_name="grpc", protocol="GRPC"),
            dr("grpc", "  trafficPolicy:\n" + simple_tls)]
    cfg += [ext_service("grpcbad", [("127.0.0.1", grpc_bad.port)], port=8080, port_name="grpc", protocol="GRPC"),
            dr("grpcbad", "  trafficPolicy:\n" + simple_tls)]
    (d / "config.yaml").write_text("".join(cfg))
    proxy = ProxyProcess(d, metrics=False, access_log=True,
                         extra=("--forward", "127.0.0.1:0=tcp.ext.test:5432",
                                "--forward", "127.0.0.1:0=tcpbad.ext.test:5432")).start()
    try:
        yield {"proxy": proxy, "up": up, "plain": plain, "grpc": grpc_up, "dir": d}
    finally:
        proxy.stop()
        for s in up.values():
            s.stop()
        plain.stop()
        grpc_up.stop()
        grpc_bad.stop()
        closed.close()


def assert_refused_without_plaintext(server: TlsUpstream) -> None:
    assert server.plaintext == [], f"plaintext reached {server.name}: {server.plaintext!r}"
    assert server.requests == [], f"a request reached {server.name} over a connection that failed verification"


def test_simple_with_ca_certificates_sends_tls_and_the_host_as_sni(env):
    status, body = get(env["proxy"], "simple.ext.test", "/hello")
    assert (status, body) == (200, b"simple")
    server = env["up"]["simple"]
    assert server.tls_connections >= 1 and server.plaintext == []
    assert server.snis[-1] == "simple.ext.test"
    assert server.requests[-1].startswith(b"GET /hello HTTP/1.1")
    # keep-alive: a second request reuses the TLS connection
    assert get(env["proxy"], "simple.ext.test")[0] == 200
    assert server.tls_connections == 1


def test_sni_setting_is_sent_and_verified(env):
    assert get(env["proxy"], "sni.ext.test") == (200, b"sni")
    assert env["up"]["sni"].snis[-1] == "alias.ext.test"


def test_subject_alt_names_one_matching_is_enough(env):
    assert get(env["proxy"], "sans.ext.test") == (200, b"sans")


def test_subject_alt_names_mismatch_is_503_uf_and_nothing_reaches_the_server(env):
    proxy, server = env["proxy"], env["up"]["sanbad"]
    assert get(env["proxy"], "sanbad.ext.test")[0] == 503
    assert server.snis and server.snis[-1] == "sanbad.ext.test"  # TLS was spoken; the names did not match
    assert_refused_without_plaintext(server)
    assert wait_for(lambda: any("sanbad" in l and "subjectAltNames" in l for l in proxy.stderr))
    assert flags_for(proxy, "sanbad.ext.test", 1) == ["UF"]


def test_hostname_mismatch_is_503_uf_logged_once_per_cluster(env):
    proxy, server = env["proxy"], env["up"]["hostbad"]
    for _ in range(3):
        assert get(proxy, "hostbad.ext.test")[0] == 503
    assert_refused_without_plaintext(server)
    assert wait_for(lambda: any("hostbad.ext.test" in l and "Hostname mismatch" in l for l in proxy.stderr))
    time.sleep(0.2)
    logged = [l for l in proxy.stderr if "TLS origination" in l and "hostbad.ext.test" in l]
    assert len(logged) == 1, logged
    assert flags_for(proxy, "hostbad.ext.test", 3) == ["UF"] * 3


def test_unknown_ca_is_503_uf_and_no_plaintext(env):
    proxy, server = env["proxy"], env["up"]["unknownca"]
    assert get(proxy, "unknownca.ext.test")[0] == 503
    assert wait_for(lambda: server.handshake_errors)  # the server thread notes it after the 503
    assert server.tls_connections == 0
    assert_refused_without_plaintext(server)
    assert wait_for(lambda: any("unknownca.ext.test" in l and "certificate verify failed" in l
                                for l in proxy.stderr))


def test_insecure_skip_verify_accepts_any_server(env):
    assert get(env["proxy"], "insecure.ext.test") == (200, b"insecure")
    assert env["up"]["insecure"].snis[-1] == "insecure.ext.test"


def test_mutual_presents_the_client_certificate(env):
    assert get(env["proxy"], "mutual.ext.test") == (200, b"mutual")
    assert env["up"]["mutual"].client_subjects == ["frontend-client"]


def test_server_requiring_a_client_certificate_refuses_simple(env):
    server = env["up"]["mutualmissing"]
    assert get(env["proxy"], "mutualmissing.ext.test")[0] == 503
    assert_refused_without_plaintext(server)
    assert server.client_subjects == []


def test_subset_tls_overrides_the_host_level(env):
    # host level: wrong CA and SNI rogue.example; subset v1: the right CA, SNI the host
    assert get(env["proxy"], "subset.ext.test") == (200, b"subset-v1")
    assert env["up"]["subset-v1"].snis[-1] == "subset.ext.test"
    assert env["up"]["subset-v2"].tls_connections == 0


def test_port_level_settings_originate_tls_over_host_level_disable(env):
    assert get(env["proxy"], "portlevel.ext.test") == (200, b"portlevel")
    assert env["up"]["portlevel"].plaintext == []


def test_tcp_relay_originates_tls(env):
    proxy, server = env["proxy"], env["up"]["tcp"]
    with socket.create_connection(("127.0.0.1", proxy.ports[1]), timeout=5) as s:
        s.sendall(b"ping over plaintext")
        got = b""
        deadline = time.monotonic() + 5
        while len(got) < len(b"PING OVER PLAINTEXT") and time.monotonic() < deadline:
            chunk = s.recv(4096)
            if not chunk:
                break
            got += chunk
    assert got == b"PING OVER PLAINTEXT"
    assert server.snis[-1] == "tcp.ext.test" and server.plaintext == []


def test_http2_upstream_over_tls_with_alpn_h2(env):
    proxy = env["proxy"]
    with grpc.insecure_channel(f"127.0.0.1:{proxy.port}",
                               options=[("grpc.default_authority", "grpc.ext.test:8080"),
                                        ("grpc.enable_retries", 0)]) as ch:
        for _ in range(3):
            assert ch.unary_unary("/test.Echo/Which")(b"x", timeout=10) == b"grpc-tls"
    assert env["grpc"].hits == 3


def test_outlier_detection_counts_tls_failures_as_connect_failures(env):
    proxy, bad, good = env["proxy"], env["up"]["outlier-bad"], env["up"]["outlier-good"]
    statuses = [get(proxy, "outlier.ext.test")[0] for _ in range(10)]
    # round robin: the bad endpoint fails twice (consecutive5xxErrors: 2) and is ejected
    assert statuses.count(503) == 2, statuses
    assert statuses[-6:] == [200] * 6
    wait_for(lambda: len(bad.handshake_errors) >= 2)
    assert len(bad.handshake_errors) == 2
    assert_refused_without_plaintext(bad)


def test_connect_failure_retry_goes_to_the_good_endpoint(env):
    proxy = env["proxy"]
    statuses = [get(proxy, "retried.ext.test")[0] for _ in range(4)]
    assert statuses == [200] * 4
    assert wait_for(lambda: env["up"]["retried-bad"].handshake_errors)  # it was tried, and failed over
    assert_refused_without_plaintext(env["up"]["retried-bad"])


def test_credential_name_fails_closed_with_a_load_warning(env):
    proxy, server = env["proxy"], env["up"]["cred"]
    warn = [l for l in proxy.stderr if "credentialName" in l and "warning" in l.lower()]
    assert warn and "config.yaml:" in warn[0] and "spec.trafficPolicy.tls.credentialName" in warn[0]
    assert get(proxy, "cred.ext.test")[0] == 503
    assert server.tls_connections == 0 and server.plaintext == [] and server.handshake_errors == []
    assert flags_for(proxy, "cred.ext.test", 1) == ["UF"]


def test_ca_crl_refuses_a_revoked_server_certificate(env):
    """caCrl: the server whose certificate the CA revoked is refused (503 UF, nothing sent to
    it); a server of the same CA that is not on the list is served."""
    status, _ = get(env["proxy"], "revoked.ext.test")
    assert status == 503
    assert flags_for(env["proxy"], "revoked.ext.test", 1) == ["UF"]
    assert_refused_without_plaintext(env["up"]["revoked"])
    assert get(env["proxy"], "crlok.ext.test") == (200, b"crlok")


def test_ca_crl_without_a_list_from_the_server_certificates_issuer_refuses_it(env):
    """Envoy's semantics: once a CRL is configured, a CA of the chain without one fails
    verification, revoked or not (here the only list comes from another CA; that the whole
    chain is checked, not the leaf alone, is the context's flags: the unit tests)."""
    status, _ = get(env["proxy"], "crlother.ext.test")
    assert status == 503
    assert_refused_without_plaintext(env["up"]["crlother"])


def access_line(proxy, authority: str | None = None, protocol: str | None = None) -> dict:
    """The latest access-log line for ``authority`` (HTTP) or ``protocol`` (TCP), once there."""
    def lines():
        return [l for l in proxy.access_log()
                if (authority is None or l.get("authority") == authority)
                and (protocol is None or l.get("protocol") == protocol)]
    assert wait_for(lambda: lines()), f"no access-log line for {authority or protocol}"
    return lines()[-1]


def test_a_tls_failure_reason_is_in_the_503_body_and_the_access_log(env):
    """Envoy's upstream_transport_failure_reason: why TLS origination failed, in the local
    reply (after "transport failure reason:") and in the access log's field of that name."""
    status, body = get(env["proxy"], "revoked.ext.test", "/why")
    assert status == 503
    assert body.startswith(b"upstream connect error or disconnect/reset before headers. reset reason: "
                           b"connection failure, transport failure reason: certificate verify failed: ")
    assert b"revoked" in body, body
    line = access_line(env["proxy"], "revoked.ext.test")
    assert line["response_flags"] == "UF"
    assert line["upstream_transport_failure_reason"] == body.split(b"transport failure reason: ", 1)[1].decode().rstrip("\n")


def test_an_http2_upstream_tls_failure_reason_is_logged(env):
    proxy = env["proxy"]
    with grpc.insecure_channel(f"127.0.0.1:{proxy.port}",
                               options=[("grpc.default_authority", "grpcbad.ext.test:8080"),
                                        ("grpc.enable_retries", 0)]) as ch:
        with pytest.raises(grpc.RpcError) as info:
            ch.unary_unary("/test.Echo/Which")(b"x", timeout=10)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    line = access_line(proxy, "grpcbad.ext.test:8080")
    assert line["response_flags"] == "UF"
    assert line["upstream_transport_failure_reason"].startswith("certificate verify failed")


def test_a_refused_connection_has_no_transport_failure_reason(env):
    status, body = get(env["proxy"], "refused.ext.test")
    assert (status, body.rstrip(b"\n")) == (503, b"upstream connect error or disconnect/reset before headers. "
                                                b"reset reason: connection failure")
    line = access_line(env["proxy"], "refused.ext.test")
    assert line["response_flags"] == "UF" and line["upstream_transport_failure_reason"] is None


def test_a_tcp_relay_logs_its_tls_failure_reason(env):
    proxy, server = env["proxy"], env["up"]["tcpbad"]
    before = len([l for l in proxy.access_log() if l.get("protocol") == "TCP"])
    with socket.create_connection(("127.0.0.1", proxy.ports[2]), timeout=5) as s:
        s.sendall(b"never sent in plaintext")
        s.settimeout(5)
        try:
            assert s.recv(100) == b""  # closed without an answer
        except ConnectionResetError:
            pass
    assert_refused_without_plaintext(server)

    def failed_lines():
        return [l for l in proxy.access_log() if l.get("protocol") == "TCP"
                and l.get("upstream_transport_failure_reason")]
    assert wait_for(lambda: failed_lines()), f"no TCP line with a failure reason after {before}"
    line = failed_lines()[-1]
    assert line["response_flags"] == "UF"
    assert line["upstream_transport_failure_reason"].startswith("certificate verify failed")


def test_disable_stays_plaintext(env):
    status, body = get(env["proxy"], "plain.ext.test")
    assert status == 200 and env["plain"].hits >= 1


def test_no_plaintext_warning_any_more(env):
    assert not any("plaintext" in l and "tls.mode" in l for l in env["proxy"].stderr)
    assert not any("not enforced" in l and ".tls." in l for l in env["proxy"].stderr)


def _wait_version(proxy, version: int) -> None:
    assert wait_for(lambda: any(f"configuration version {version} loaded" in l for l in proxy.stderr), 10), \
        "".join(proxy.stderr[-20:])


def test_reload_changing_the_ca_file_and_a_bad_file_keeps_the_last_good(tmp_path):
    certs = tmp_path / "certs"
    certs.mkdir()
    ca, other = TestCA(certs, "a"), TestCA(certs, "b")
    server = TlsUpstream("reload", *ca.issue("reload", dns=["reload.ext.test"])).start()
    cafile = tmp_path / "ca-in-use.pem"
    cafile.write_bytes(other.cert_file.read_bytes())  # the wrong CA first
    conf = tmp_path / "conf"
    conf.mkdir()
    base = FRONTEND + ext_service("reload", [server.address]) + vs("reload")

    def write(ca_path, comment: str) -> None:
        (conf / "config.yaml").write_text(
            base + dr("reload", f"  trafficPolicy:\n    tls:\n      mode: SIMPLE\n      caCertificates: {ca_path}\n")
            + f"# {comment}\n")

    write(cafile, "1")
    proxy = ProxyProcess(conf, metrics=False).start()
    try:
        assert get(proxy, "reload.ext.test")[0] == 503
        # the file now holds the right CA: the config reload (a changed comment) rebuilds the context
        cafile.write_bytes(ca.cert_file.read_bytes())
        write(cafile, "2")
        _wait_version(proxy, 2)
        assert get(proxy, "reload.ext.test") == (200, b"reload")
        # a broken CA file: a warning naming the field and file; the last good context keeps serving
        cafile.write_text("garbage\n")
        write(cafile, "3")
        _wait_version(proxy, 3)
        assert get(proxy, "reload.ext.test") == (200, b"reload")
        assert wait_for(lambda: any("caCertificates" in l and str(cafile) in l and "last good" in l
                                    for l in proxy.stderr))
        # a DestinationRule naming a missing file: the same
        write(tmp_path / "nope.pem", "4")
        _wait_version(proxy, 4)
        assert get(proxy, "reload.ext.test") == (200, b"reload")
        assert wait_for(lambda: any("nope.pem" in l and "cannot read" in l for l in proxy.stderr))
        assert not any("Traceback" in l for l in proxy.stderr)
    finally:
        proxy.stop()
        server.stop()
    assert server.plaintext == []


SAMPLE = "/work/shared/istio-samples/bookinfo-networking/egress-rule-google-apis.yaml"


def test_istio_egress_tls_origination_sample(tmp_path, monkeypatch):
    """The Istio sample (port 80 rewritten to 443 by the VirtualService, the DestinationRule's
    portLevelSettings originate TLS on 443, no caCertificates: the system trust store), with
    the ServiceEntry's DNS resolution replaced by a loopback endpoint and the trust store
    pointed at the test CA (SSL_CERT_FILE, honoured by OpenSSL)."""
    text = open(SAMPLE).read()
    assert "mode: SIMPLE" in text and "resolution: DNS" in text
    certs = tmp_path / "certs"
    certs.mkdir()
    ca = TestCA(certs, "public")
    server = TlsUpstream("googleapis", *ca.issue("googleapis", dns=["www.googleapis.com"])).start()
    text = text.replace("  resolution: DNS\n", f"""  resolution: STATIC
  endpoints:
  - address: 127.0.0.1
    ports:
      https: {server.port}
""")
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "sample.yaml").write_text(text)
    (conf / "frontend.yaml").write_text(FRONTEND)
    monkeypatch.setenv("SSL_CERT_FILE", str(ca.cert_file))
    proxy = ProxyProcess(conf, metrics=False, workload="default/sleep").start()
    try:
        assert get(proxy, "www.googleapis.com", "/books/v1/volumes") == (200, b"googleapis")
        assert not any("warning" in l.lower() for l in proxy.stderr), proxy.stderr
    finally:
        proxy.stop()
        server.stop()
    assert server.snis == ["www.googleapis.com"]
    assert server.requests[0].startswith(b"GET /books/v1/volumes HTTP/1.1")
    assert server.plaintext == []
