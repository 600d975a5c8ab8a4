"""Load balancing, match fields, weighted split, retry tokens and keep-alive idle close,
end to end: a real `nodeagent proxy` in front of real upstream servers on loopback.

policy/ decides these in-process (tests/unit); here every decision is observed from
the outside: the upstream that answered (``x-instance``), what it received, what the
client got. Statistical checks take their tolerance from the binomial distribution
(a false failure probability of at most 1e-6 per check).
"""
from __future__ import annotations

import http.client
import json
import math
import socket
import threading
import time

import pytest

from nodeagent.proxy.runtime import SWEEP_TICK
from tests.integration.proxy_harness import ProxyProcess
from tests.integration.upstream import UpstreamServer

NS = "shop"
ALPHA = 1e-6  # accepted false-failure probability of one statistical check


def fqdn(name: str) -> str:
    return f"{name}.{NS}.svc.cluster.local"


# --- config -------------------------------------------------------------------------------

def service_entry(name: str, ports=((80, "http"),)) -> str:
    port_yaml = "".join(f"  - number: {n}\n    name: {pn}\n    protocol: HTTP\n" for n, pn in ports)
    return f"""---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: {name}
  namespace: {NS}
spec:
  hosts:
  - {fqdn(name)}
  location: MESH_INTERNAL
  resolution: STATIC
  ports:
{port_yaml}  workloadSelector:
    labels:
      app: {name}
"""


def workload_entry(name: str, address: str, ports: dict, labels: dict, sa: str = "") -> str:
    port_yaml = "".join(f"\n    {k}: {v}" for k, v in ports.items())
    label_yaml = "".join(f"\n    {k}: {v}" for k, v in labels.items())
    return f"""---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata:
  name: {name}
  namespace: {NS}
spec:
  address: {address}
{("  serviceAccount: " + sa + chr(10)) if sa else ""}{("  ports:" + port_yaml + chr(10)) if ports else ""}  labels:{label_yaml}
"""


def service(name: str, servers, labels: dict | None = None) -> str:
    """A one-port (80/http) service whose endpoints are ``servers`` (UpstreamServer or ClosedPort)."""
    out = [service_entry(name)]
    for i, s in enumerate(servers):
        out.append(workload_entry(f"{name}-{i}", s.address[0], {"http": s.address[1]},
                                  {"app": name, **(labels or {})}))
    return "".join(out)


def resource(kind: str, name: str, spec: str) -> str:
    return f"""---
apiVersion: networking.istio.io/v1
kind: {kind}
metadata:
  name: {name}
  namespace: {NS}
spec:
{spec}"""


def destination_rule(name: str, traffic_policy: str, subsets: str = "") -> str:
    return resource("DestinationRule", name, f"  host: {fqdn(name)}\n  trafficPolicy:\n{traffic_policy}{subsets}")


def virtual_service(name: str, http: str) -> str:
    return resource("VirtualService", name, f"  hosts:\n  - {fqdn(name)}\n  http:\n{http}")


def retry_route(name: str, retry_on: str) -> str:
    return virtual_service(name, f"""  - retries:
      attempts: 2
      retryOn: "{retry_on}"
    route:
    - destination:
        host: {fqdn(name)}
""") + destination_rule(name, "    loadBalancer:\n      simple: ROUND_ROBIN\n")


def tagged(rule: str, match: str | None, dest: str = "match") -> str:
    """A rule that tags the request with ``x-rule: RULE`` (seen by the upstream's echo)."""
    m = f"  - match:\n{match}" if match else "  -"
    sep = "\n    " if match else " "
    return (f"{m}{sep}headers:\n      request:\n        set:\n          x-rule: {rule}\n"
            f"    route:\n    - destination:\n        host: {fqdn(dest)}\n")


MATCH_RULES = "".join([
    tagged("method", "    - uri:\n        prefix: /method\n      method:\n        exact: PUT\n"),
    tagged("query", "    - uri:\n        prefix: /query\n      queryParams:\n        color:\n          exact: dark red\n"
                    "        id:\n          regex: '[0-9]+'\n"),
    tagged("query-present", "    - uri:\n        prefix: /qflag\n      queryParams:\n        debug: {}\n"),
    tagged("authority", "    - uri:\n        prefix: /authority\n      authority:\n        exact: match.shop\n"),
    tagged("without", "    - uri:\n        prefix: /without\n      withoutHeaders:\n        x-env:\n          exact: test\n"
                      "        x-block: {}\n"),
    tagged("source-v2", "    - uri:\n        prefix: /source\n      sourceLabels:\n        app: frontend\n"
                        "        version: v2\n"),
    tagged("source", "    - uri:\n        prefix: /source\n      sourceLabels:\n        app: frontend\n"),
    tagged("case-exact", "    - uri:\n        exact: /CaseLess\n      ignoreUriCase: true\n"),
    tagged("case-prefix", "    - uri:\n        prefix: /Folder/\n      ignoreUriCase: true\n"),
    tagged("case-regex", "    - uri:\n        regex: /Rx[0-9]\n      ignoreUriCase: true\n"),
    tagged("sensitive", "    - uri:\n        exact: /Sensitive\n"),
    tagged("default", None),
])


class ClosedPort:
    """An address where nothing listens (connection refused)."""

    def __init__(self, host: str) -> None:
        with socket.socket() as s:
            s.bind((host, 0))
            self.address = s.getsockname()


class ResettingUpstream(UpstreamServer):
    """Reads a request, sends the start of a response head, then closes the connection."""

    async def _respond(self, req, parser, writer) -> bool:
        self.hits += 1
        self.requests.append({"path": req.url.decode("latin-1"), "headers": req.headers})
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-le")
        await writer.drain()
        return False


# --- fixtures -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("proxy-lb-match")
    started: list[UpstreamServer] = []

    def up(name, host, cls=UpstreamServer):
        s = cls(name, host=host).start()
        started.append(s)
        return s

    four = [up(f"e{i}", f"127.0.2.{i + 1}") for i in range(4)]
    servers = {
        "four": four,
        "match": up("match0", "127.0.2.20"),
        "port80": up("port80", "127.0.2.30"),
        "port8080": up("port8080", "127.0.2.30"),
        "split": [up("split-a", "127.0.2.35"), up("split-b", "127.0.2.36")],
        "pair": [up("bad", "127.0.2.40"), up("good", "127.0.2.41")],
        "resetting": up("resetting", "127.0.2.42", ResettingUpstream),
        "good2": up("good2", "127.0.2.43"),
    }
    dead = ClosedPort("127.0.2.44")
    cfg = [
        workload_entry("frontend", "127.0.0.1", {}, {"app": "frontend", "version": "v1"}, sa="frontend"),
        workload_entry("backend", "127.0.0.1", {}, {"app": "backend", "version": "v1"}, sa="backend"),
    ]
    hash_settings = {
        "hh": "        httpHeaderName: x-user\n",
        "hc": "        httpCookie:\n          name: session\n",
        "hs": "        useSourceIp: true\n",
        "hq": "        httpQueryParameterName: user\n",
    }
    for name, setting in hash_settings.items():
        cfg.append(service(name, four))
        cfg.append(destination_rule(name, "    loadBalancer:\n      consistentHash:\n" + setting))
    cfg.append(service("rr", four) + destination_rule("rr", "    loadBalancer:\n      simple: ROUND_ROBIN\n"))
    cfg.append(service("rand", four) + destination_rule("rand", "    loadBalancer:\n      simple: RANDOM\n"))
    # host level LEAST_REQUEST; subset "sticky" overrides it with a consistent hash on x-user.
    cfg.append(service("sub", four, {"pool": "p"}) + destination_rule("sub", """\
    loadBalancer:
      simple: LEAST_REQUEST
""", """\
  subsets:
  - name: sticky
    labels:
      pool: p
    trafficPolicy:
      loadBalancer:
        consistentHash:
          httpHeaderName: x-user
  - name: plain
    labels:
      pool: p
"""))
    cfg.append(virtual_service("sub", f"""\
  - match:
    - uri:
        prefix: /sticky
    route:
    - destination:
        host: {fqdn("sub")}
        subset: sticky
  - route:
    - destination:
        host: {fqdn("sub")}
        subset: plain
"""))
    # two ports; the route, not the request, decides the destination port.
    cfg.append(service_entry("multi", ((80, "http"), (8080, "http-alt"))))
    cfg.append(workload_entry("multi-0", "127.0.2.30", {"http": servers["port80"].port,
                                                         "http-alt": servers["port8080"].port}, {"app": "multi"}))
    cfg.append(virtual_service("multi", f"""\
  - match:
    - uri:
        prefix: /alt
    route:
    - destination:
        host: {fqdn("multi")}
        port:
          number: 8080
  - route:
    - destination:
        host: {fqdn("multi")}
        port:
          number: 80
"""))
    cfg.append(service("match", [servers["match"]]) + virtual_service("match", MATCH_RULES))
    cfg.append(service_entry("split"))
    for i, (s, version) in enumerate(zip(servers["split"], ("a", "b"))):
        cfg.append(workload_entry(f"split-{i}", s.host, {"http": s.port}, {"app": "split", "version": version}))
    cfg.append(destination_rule("split", "    loadBalancer:\n      simple: ROUND_ROBIN\n",
                                "  subsets:\n  - name: a\n    labels:\n      version: a\n"
                                "  - name: b\n    labels:\n      version: b\n"))
    cfg.append(virtual_service("split", f"""\
  - route:
    - destination:
        host: {fqdn("split")}
        subset: a
      weight: 20
    - destination:
        host: {fqdn("split")}
        subset: b
      weight: 80
"""))
    # retries: every retry service has ROUND_ROBIN over (failing endpoint, healthy endpoint)
    for name, retry_on in (("rgw", "gateway-error"), ("r4xx", "retriable-4xx"),
                           ("rcodes", "retriable-status-codes,500,429")):
        cfg.append(service(name, servers["pair"]) + retry_route(name, retry_on))
    for name, retry_on in (("rcf", "connect-failure"), ("rcf-off", "retriable-4xx")):
        cfg.append(service(name, [dead, servers["good2"]]) + retry_route(name, retry_on))
    for name, retry_on in (("rreset", "reset"), ("rreset-off", "connect-failure")):
        cfg.append(service(name, [servers["resetting"], servers["good2"]]) + retry_route(name, retry_on))
    (d / "config.yaml").write_text("".join(cfg))

    proxies = {}

    def start(key, **kw):
        proxies[key] = ProxyProcess(d, metrics=False, **kw).start()

    threads = [threading.Thread(target=start, args=("frontend",)),
               threading.Thread(target=start, args=("backend",),
                                kwargs={"workload": "shop/backend", "extra": ("--idle-timeout", str(IDLE))})]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    try:
        assert set(proxies) == {"frontend", "backend"}, "both proxies started"
        yield proxies, servers
    finally:
        for p in proxies.values():
            p.stop()
        for s in started:
            s.stop()


IDLE = 0.6  # --idle-timeout of the "backend" proxy


# --- clients ------------------------------------------------------------------------------

class Client:
    """A keep-alive HTTP/1.1 client to the proxy, optionally from a given source address."""

    def __init__(self, proxy: ProxyProcess, source: str | None = None) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10,
                                               source_address=(source, 0) if source else None)

    def get(self, path: str, host: str, headers: dict | None = None, method: str = "GET"):
        self.conn.request(method, path, headers={"Host": host, **(headers or {})})
        resp = self.conn.getresponse()
        body = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, body

    def instance(self, path: str, host: str, headers: dict | None = None) -> str:
        status, headers, _ = self.get(path, host, headers)
        assert status == 200
        return headers["x-instance"]

    def close(self) -> None:
        self.conn.close()


@pytest.fixture
def client(env):
    c = Client(env[0]["frontend"])
    yield c
    c.close()


def binomial_bounds(n: int, p: float, alpha: float = ALPHA) -> tuple[int, int]:
    """(lo, hi) such that a Binomial(n, p) count falls outside [lo, hi] with probability <= alpha."""
    def pmf(k):
        if p in (0.0, 1.0):
            return float(k == round(n * p))
        return math.exp(math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)
                        + k * math.log(p) + (n - k) * math.log(1 - p))
    lo, tail = 0, 0.0
    while tail + pmf(lo) <= alpha / 2:
        tail += pmf(lo)
        lo += 1
    hi, tail = n, 0.0
    while tail + pmf(hi) <= alpha / 2:
        tail += pmf(hi)
        hi -= 1
    return lo, hi


def assert_consistent_hash(pick, keys_repeated: int = 8, repeats: int = 6, spread_keys: int = 64) -> None:
    """``pick(key) -> instance``: one key always gives one endpoint; many keys reach all four.

    With a ring of 1024 points per endpoint each of the four gets about 1/4 of the keys,
    so 64 keys miss one of them with probability about 4 * (3/4)^64 < 1e-7."""
    for k in range(keys_repeated):
        seen = {pick(f"key-{k}") for _ in range(repeats)}
        assert len(seen) == 1, f"key-{k} went to {seen}"
    spread = {pick(f"spread-{k}") for k in range(spread_keys)}
    assert spread == {"e0", "e1", "e2", "e3"}, f"{spread_keys} keys reached only {spread}"


# --- load balancing -----------------------------------------------------------------------

def test_consistent_hash_by_header(client):
    assert_consistent_hash(lambda key: client.instance("/", fqdn("hh"), {"x-user": key}))


def test_consistent_hash_by_cookie(client):
    n = iter(range(10 ** 6))
    # other cookies around the hashed one change nothing
    assert_consistent_hash(lambda key: client.instance(
        "/", fqdn("hc"), {"cookie": f"theme=t{next(n)}; session={key}; lang=en"}))


def test_consistent_hash_by_query_parameter(client):
    n = iter(range(10 ** 6))
    assert_consistent_hash(lambda key: client.instance(f"/items?page={next(n)}&user={key}", fqdn("hq")))


def test_consistent_hash_by_source_ip(env):
    proxy = env[0]["frontend"]
    sources = {}

    def pick(key):
        # each key is one source address; every request is a new connection (a new source port)
        ip = sources.setdefault(key, f"127.0.3.{len(sources) + 1}")
        c = Client(proxy, source=ip)
        try:
            status, headers, body = c.get("/", fqdn("hs"))
            assert status == 200
            return headers["x-instance"]
        finally:
            c.close()
    assert_consistent_hash(pick, keys_repeated=6, repeats=4, spread_keys=64)


def test_round_robin_is_a_strict_rotation(client):
    seq = [client.instance("/", fqdn("rr")) for _ in range(12)]
    assert sorted(seq[:4]) == ["e0", "e1", "e2", "e3"], seq
    assert all(seq[i] == seq[i % 4] for i in range(12)), f"not a rotation: {seq}"


def test_random_spreads_uniformly_and_is_not_a_rotation(client):
    n = 400
    seq = [client.instance("/", fqdn("rand")) for _ in range(n)]
    lo, hi = binomial_bounds(n, 1 / 4, ALPHA / 4)
    for name in ("e0", "e1", "e2", "e3"):
        assert lo <= seq.count(name) <= hi, f"{name}: {seq.count(name)} of {n}, expected {lo}..{hi}"
    # a uniform random sequence repeats its predecessor a quarter of the time; a rotation never does
    repeats = sum(a == b for a, b in zip(seq, seq[1:]))
    lo, hi = binomial_bounds(n - 1, 1 / 4, ALPHA)
    assert lo <= repeats <= hi, f"{repeats} immediate repeats in {n} picks, expected {lo}..{hi}"


def test_subset_load_balancer_overrides_the_host_level_one(client):
    # subset "sticky": consistent hash on x-user
    assert_consistent_hash(lambda key: client.instance("/sticky", fqdn("sub"), {"x-user": key}))
    # subset "plain": the host-level LEAST_REQUEST, which ignores x-user. Sequential requests
    # have no active requests to compare, so one key spreads: 40 requests all on one of four
    # endpoints has probability 4 * (1/4)^40.
    seen = {client.instance("/plain", fqdn("sub"), {"x-user": "key-0"}) for _ in range(40)}
    assert len(seen) >= 2, f"the host-level LEAST_REQUEST sent one key to {seen} only"


def test_destination_port_selects_the_cluster_port(client):
    host = fqdn("multi")
    assert client.instance("/alt/x", host) == "port8080"
    assert client.instance("/x", host) == "port80"
    # the route's port wins over the port the request was addressed to
    assert client.instance("/x", host + ":8080") == "port80"
    assert client.instance("/alt", host + ":80") == "port8080"


def test_weighted_split_follows_the_weights(client):
    n = 400
    seq = [client.instance("/", fqdn("split")) for _ in range(n)]
    assert set(seq) <= {"split-a", "split-b"}
    lo, hi = binomial_bounds(n, 0.2)
    assert lo <= seq.count("split-a") <= hi, f"weight 20 got {seq.count('split-a')}/{n}, expected {lo}..{hi}"


# --- match fields -------------------------------------------------------------------------

def rule_for(client_or_proxy, path, host=fqdn("match"), headers=None, method="GET") -> str:
    status, _, body = client_or_proxy.get(path, host, headers, method=method)
    assert status == 200
    seen = json.loads(body)
    assert seen["path"] == path
    return seen["headers"]["x-rule"]


def test_match_method(client):
    assert rule_for(client, "/method", method="PUT") == "method"
    assert rule_for(client, "/method", method="GET") == "default"
    assert rule_for(client, "/method", method="POST") == "default"


def test_match_query_params(client):
    # exact compares the first value, percent-decoded; regex is a full match
    assert rule_for(client, "/query?color=dark%20red&id=42") == "query"
    assert rule_for(client, "/query?id=7&x=1&color=dark%20red") == "query"
    assert rule_for(client, "/query?color=dark%20red&id=42x") == "default"
    assert rule_for(client, "/query?color=dark&id=42") == "default"
    assert rule_for(client, "/query?id=42") == "default"
    assert rule_for(client, "/query?color=red&id=42&color=dark%20red") == "default"
    # {} is a presence match
    assert rule_for(client, "/qflag?debug") == "query-present"
    assert rule_for(client, "/qflag?debug=0") == "query-present"
    assert rule_for(client, "/qflag?nodebug=1") == "default"


def test_match_authority_as_received(client):
    assert rule_for(client, "/authority", host="match.shop") == "authority"
    assert rule_for(client, "/authority", host=fqdn("match")) == "default"
    assert rule_for(client, "/authority", host="match.shop:80") == "default"


def test_match_without_headers(client):
    assert rule_for(client, "/without") == "without"
    assert rule_for(client, "/without", headers={"x-env": "prod"}) == "without"
    assert rule_for(client, "/without", headers={"x-env": "test"}) == "default"
    assert rule_for(client, "/without", headers={"x-block": ""}) == "default"
    assert rule_for(client, "/without", headers={"x-block": "1", "x-env": "prod"}) == "default"


def test_match_source_labels(env, client):
    # the frontend workload (app=frontend, version=v1) matches {app: frontend} but not version v2
    assert rule_for(client, "/source") == "source"
    other = Client(env[0]["backend"])
    try:
        assert rule_for(other, "/source") == "default"
        assert rule_for(other, "/method", method="PUT") == "method", "the backend proxy routes the same table"
    finally:
        other.close()


def test_match_ignore_uri_case(client):
    for path in ("/CaseLess", "/caseless", "/CASELESS"):
        assert rule_for(client, path) == "case-exact"
    assert rule_for(client, "/caseless/more") == "default"
    for path in ("/Folder/a", "/folder/a", "/FOLDER/A"):
        assert rule_for(client, path) == "case-prefix"
    # ignoreUriCase does not apply to regex (Istio/Envoy)
    assert rule_for(client, "/Rx1") == "case-regex"
    assert rule_for(client, "/rx1") == "default"
    # and without ignoreUriCase a match is case sensitive
    assert rule_for(client, "/Sensitive") == "sensitive"
    assert rule_for(client, "/sensitive") == "default"


# --- retries ------------------------------------------------------------------------------

def retried_to(server: UpstreamServer, since: int) -> int:
    return sum(r["headers"].get("x-envoy-attempt-count") == "2" for r in server.requests[since:])


def run_retry_case(client, host, bad, good, *, retried: bool, bad_status: int | None = None, n: int = 6):
    """``n`` requests to ``host`` over ROUND_ROBIN (bad, good): with ``retried`` every failed
    first try is retried once to ``good`` and the client sees only 200s; without, the client
    sees each failure."""
    bad_hits, good_len = bad.hits, len(good.requests)
    if bad_status is not None:
        bad.status = bad_status
    try:
        results = [client.get("/", host)[:2] for _ in range(n)]
    finally:
        if bad_status is not None:
            bad.status = 200
    failed_first_tries = bad.hits - bad_hits
    assert failed_first_tries >= 1, "round robin sent some first tries to the failing endpoint"
    if retried:
        assert [(s, h["x-instance"]) for s, h in results] == [(200, good.name)] * n
        assert retried_to(good, good_len) == failed_first_tries, "each failed try was retried once"
    else:
        statuses = [s for s, _ in results]
        assert statuses.count(200) == n - failed_first_tries, statuses
        assert retried_to(good, good_len) == 0
    return [s for s, _ in results]


def test_retry_on_gateway_error(env, client):
    bad, good = env[1]["pair"]
    for code in (502, 503, 504):
        run_retry_case(client, fqdn("rgw"), bad, good, retried=True, bad_status=code)
    statuses = run_retry_case(client, fqdn("rgw"), bad, good, retried=False, bad_status=500)
    assert set(statuses) == {200, 500}


def test_retriable_4xx_does_not_retry_other_4xx(env, client):
    bad, good = env[1]["pair"]
    statuses = run_retry_case(client, fqdn("r4xx"), bad, good, retried=False, bad_status=404)
    assert set(statuses) == {200, 404}


def test_retry_on_retriable_status_codes_list(env, client):
    bad, good = env[1]["pair"]
    # 500 is retried only because the list names it (no 5xx or gateway-error token)
    run_retry_case(client, fqdn("rcodes"), bad, good, retried=True, bad_status=500)
    # retryOn replaces Istio's default policy: 503 is no longer retriable here
    statuses = run_retry_case(client, fqdn("rcodes"), bad, good, retried=False, bad_status=503)
    assert set(statuses) == {200, 503}


def test_retry_on_connect_failure(env, client):
    good = env[1]["good2"]
    n = 6
    since = len(good.requests)
    results = [client.get("/", fqdn("rcf"))[:2] for _ in range(n)]
    assert [(s, h["x-instance"]) for s, h in results] == [(200, "good2")] * n
    assert retried_to(good, since) >= 1, "first tries to the dead endpoint were retried"
    # retryOn without connect-failure: the refused connection is the client's 503 UF
    since = len(good.requests)
    results = [client.get("/", fqdn("rcf-off")) for _ in range(n)]
    failed = [body for s, _, body in results if s == 503]
    assert failed and all(b"connection failure" in body for body in failed)
    assert [s for s, _, _ in results].count(200) == n - len(failed)
    assert retried_to(good, since) == 0


def test_retry_on_reset(env, client):
    resetting, good = env[1]["resetting"], env[1]["good2"]
    n = 6
    hits, since = resetting.hits, len(good.requests)
    results = [client.get("/", fqdn("rreset"))[:2] for _ in range(n)]
    assert [(s, h["x-instance"]) for s, h in results] == [(200, "good2")] * n
    assert resetting.hits - hits >= 1
    assert retried_to(good, since) == resetting.hits - hits
    # retryOn connect-failure does not cover a reset: the client gets the 503
    hits, since = resetting.hits, len(good.requests)
    statuses = [client.get("/", fqdn("rreset-off"))[0] for _ in range(n)]
    assert resetting.hits - hits >= 1
    assert statuses.count(503) == resetting.hits - hits
    assert statuses.count(200) == n - (resetting.hits - hits)
    assert retried_to(good, since) == 0


# --- keep-alive idle close ----------------------------------------------------------------

def raw_get(sock: socket.socket, path: str = "/", headers: str = "") -> bytes:
    """One request on a keep-alive raw socket; returns the whole response."""
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {fqdn('rr')}\r\n{headers}\r\n".encode())
    data = b""
    while b"\r\n\r\n" not in data:
        part = sock.recv(65536)
        assert part, f"connection closed before a response: {data!r}"
        data += part
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(next(l.split(b":")[1] for l in head.split(b"\r\n") if l.lower().startswith(b"content-length")))
    while len(body) < length:
        part = sock.recv(65536)
        assert part
        body += part
    return head


def wait_closed(sock: socket.socket, limit: float) -> float:
    """Seconds until the peer closes ``sock`` (which must not send anything)."""
    started = time.monotonic()
    sock.settimeout(limit)
    assert sock.recv(1) == b"", "no bytes on an idle connection"
    return time.monotonic() - started


def test_keep_alive_connection_closes_after_idle_timeout(env):
    proxy = env[0]["backend"]
    # the timer advances in SWEEP_TICK steps from the last activity, so the close comes
    # between IDLE - SWEEP_TICK and IDLE + SWEEP_TICK after it (plus scheduling slack)
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
    try:
        assert raw_get(sock).startswith(b"HTTP/1.1 200")
        elapsed = wait_closed(sock, IDLE + 5)
        assert IDLE - SWEEP_TICK - 0.05 <= elapsed <= IDLE + SWEEP_TICK + 1.0, elapsed
    finally:
        sock.close()


def test_activity_keeps_the_connection_open_and_restarts_the_idle_clock(env):
    proxy = env[0]["backend"]
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
    try:
        # requests spaced by less than the idle timeout (minus the timer's step) keep it
        # open: 5 requests over about 3 idle timeouts, all on this one connection
        gap = IDLE - SWEEP_TICK - 0.15
        started = time.monotonic()
        for i in range(5):
            if i:
                time.sleep(gap)
            assert raw_get(sock).startswith(b"HTTP/1.1 200")
        assert time.monotonic() - started > IDLE
        # the idle clock counts from the last request, not from the connection's start
        assert wait_closed(sock, IDLE + 5) >= IDLE - SWEEP_TICK - 0.05
    finally:
        sock.close()


def test_the_connection_idle_timeout_does_not_cut_a_request_in_flight(env):
    """--idle-timeout (Envoy's connection idle_timeout) counts only while no request is
    active: an answer 2 idle timeouts late still arrives (the stream idle timeout, 5 min by
    default, is what bounds a request in flight), and the idle clock starts after it."""
    proxy = env[0]["backend"]
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
    try:
        started = time.monotonic()
        head = raw_get(sock, headers=f"x-delay: {2 * IDLE}\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head
        assert time.monotonic() - started >= 2 * IDLE
        assert wait_closed(sock, IDLE + 5) >= IDLE - SWEEP_TICK - 0.05
    finally:
        sock.close()


@pytest.mark.parametrize("host,code", [("r4xx", 409), ("rcodes", 429)])
def test_4xx_retry(env, client, host, code):
    """retriable-4xx (409) and 4xx codes a retriable-status-codes list names are retried,
    as policy.retry.should_retry and Envoy decide."""
    bad, good = env[1]["pair"]
    run_retry_case(client, fqdn(host), bad, good, retried=True, bad_status=code)
