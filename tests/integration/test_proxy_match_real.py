"""VirtualService match fields through a real `nodeagent proxy` and a real upstream,
the ones tests/integration/test_proxy_lb_match.py does not already cover there
(it has method, queryParams, authority exact, withoutHeaders exact/{}, sourceLabels,
ignoreUriCase): ``headers`` exact / prefix / regex / ``{}`` (and lower-cased keys,
AND inside a match, OR across matches), ``withoutHeaders`` prefix / regex, ``port``
(from the Host header on the HTTP listener, and from a ``--forward`` listener bound
to the port whatever the Host says), ``scheme``, ``sourceNamespace`` (with and
without ``sourceLabels``), and ``uri`` regex against a path with a query.

Every rule sets ``x-rule: NAME`` on the forwarded request; the upstream echoes the
headers it received, so each test reads which rule the proxy chose.
"""
from __future__ import annotations

import http.client
import json
import threading

import pytest

from tests.integration.proxy_harness import ProxyProcess
from tests.integration.upstream import UpstreamServer

NS = "shop"
HOST = f"m.{NS}.svc.cluster.local"


def rule(name: str, matches: list[str] | None) -> str:
    """An http rule tagging the request ``x-rule: NAME``; each match entry is YAML for
    the fields of one HTTPMatchRequest (indented by the caller's convention below)."""
    head = "  - match:\n" + "".join(f"    - {m}\n" for m in matches) if matches else "  -\n"
    return (head + f"    headers:\n      request:\n        set:\n          x-rule: {name}\n"
            f"    route:\n    - destination:\n        host: {HOST}\n")


def m(*fields: str) -> str:
    """One match entry from 'key: value' lines (the first on the '- ' line)."""
    return "\n      ".join(fields)


RULES = "".join([
    rule("hdr-exact", [m("uri: {prefix: /h/exact}", "headers: {x-user: {exact: alice}}")]),
    rule("hdr-prefix", [m("uri: {prefix: /h/prefix}", "headers: {x-user: {prefix: bo}}")]),
    rule("hdr-regex", [m("uri: {prefix: /h/regex}", "headers: {x-user: {regex: 'c[a-z]+[0-9]{2}'}}")]),
    rule("hdr-present", [m("uri: {prefix: /h/present}", "headers: {x-flag: {}}")]),
    rule("hdr-upper", [m("uri: {prefix: /h/upper}", "headers: {X-Upper: {exact: v}}")]),
    rule("hdr-and", [m("uri: {prefix: /h/and}", "headers: {x-a: {exact: '1'}, x-b: {regex: '[0-9]+'}}")]),
    rule("hdr-or", [m("uri: {prefix: /h/or}", "headers: {x-a: {exact: '1'}}"),
                    m("uri: {prefix: /h/or}", "headers: {x-b: {exact: '2'}}")]),
    rule("without-prefix", [m("uri: {prefix: /wo/prefix}", "withoutHeaders: {x-env: {prefix: prod}}")]),
    rule("without-regex", [m("uri: {prefix: /wo/regex}", "withoutHeaders: {x-env: {regex: 'te.t'}}")]),
    rule("port-8080", [m("uri: {prefix: /p}", "port: 8080")]),
    rule("port-80", [m("uri: {prefix: /p}", "port: 80")]),
    rule("scheme-https", [m("uri: {prefix: /s}", "scheme: {exact: https}")]),
    rule("scheme-http", [m("uri: {prefix: /s}", "scheme: {exact: http}")]),
    rule("ns-shop", [m("uri: {prefix: /ns}", "sourceNamespace: shop")]),
    rule("ns-ops-tool", [m("uri: {prefix: /ns}", "sourceNamespace: ops", "sourceLabels: {app: tool}")]),
    rule("uri-regex", [m("uri: {regex: '/items/[0-9]+'}")]),
    rule("default", None),
])


def config(server: UpstreamServer) -> str:
    host, port = server.address
    workloads = "".join(f"""---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata:
  name: {name}
  namespace: {ns}
spec:
  address: 127.0.0.1
  serviceAccount: {name}
  labels:
    app: {name}
""" for ns, name in ((NS, "frontend"), ("ops", "tool"), ("ops", "other")))
    return f"""apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: m
  namespace: {NS}
spec:
  hosts:
  - {HOST}
  location: MESH_INTERNAL
  resolution: STATIC
  ports:
  - number: 80
    name: http
    protocol: HTTP
  - number: 8080
    name: http-alt
    protocol: HTTP
  workloadSelector:
    labels:
      app: m
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata:
  name: m-0
  namespace: {NS}
spec:
  address: {host}
  ports:
    http: {port}
    http-alt: {port}
  labels:
    app: m
{workloads}---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: m
  namespace: {NS}
spec:
  hosts:
  - {HOST}
  http:
{RULES}"""


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("proxy-match-real")
    server = UpstreamServer("m0", host="127.0.11.1").start()
    (d / "config.yaml").write_text(config(server))
    proxies: dict[str, ProxyProcess] = {}
    errors: list[BaseException] = []

    def start(key: str, workload: str, extra: tuple = ()) -> None:
        try:
            proxies[key] = ProxyProcess(d, workload=workload, metrics=False, extra=extra).start()
        except BaseException as exc:  # reported below, after every thread is done
            errors.append(exc)

    threads = [threading.Thread(target=start, args=("frontend", f"{NS}/frontend",
                                                    ("--forward", f"127.0.0.1:0={HOST}:8080"))),
               threading.Thread(target=start, args=("tool", "ops/tool")),
               threading.Thread(target=start, args=("other", "ops/other"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    try:
        assert not errors, errors
        assert set(proxies) == {"frontend", "tool", "other"}
        yield proxies, server
    finally:
        for p in proxies.values():
            p.stop()
        server.stop()


def chosen(proxy: ProxyProcess, path: str, headers: list[tuple[str, str]] | None = None,
           host: str = HOST, port: int | None = None) -> str:
    """The rule the proxy chose for GET ``path`` (the x-rule header the upstream received)."""
    conn = http.client.HTTPConnection("127.0.0.1", port or proxy.port, timeout=10)
    try:
        conn.putrequest("GET", path, skip_host=True, skip_accept_encoding=True)
        conn.putheader("Host", host)
        for k, v in headers or ():
            conn.putheader(k, v)
        conn.endheaders()
        resp = conn.getresponse()
        body = resp.read()
    finally:
        conn.close()
    assert resp.status == 200, (resp.status, body)
    seen = json.loads(body)
    assert seen["path"] == path
    return seen["headers"]["x-rule"]


@pytest.fixture
def front(env):
    return env[0]["frontend"]


def test_header_exact(front):
    assert chosen(front, "/h/exact", [("x-user", "alice")]) == "hdr-exact"
    for value in ("Alice", "alice2", "alic"):
        assert chosen(front, "/h/exact", [("x-user", value)]) == "default", value
    assert chosen(front, "/h/exact") == "default", "a missing header fails the match"


def test_a_repeated_header_is_matched_as_its_values_joined_by_commas(front):
    """Envoy matches a header sent several times on its values joined by "," (as its
    header map presents it): "alice" then "bob" is "alice,bob"."""
    assert chosen(front, "/h/exact", [("x-user", "alice"), ("x-user", "bob")]) == "default"
    assert chosen(front, "/h/prefix", [("x-user", "bob"), ("x-user", "zed")]) == "hdr-prefix"
    assert chosen(front, "/h/regex", [("x-user", "carl42"), ("x-user", "carl42")]) == "default"


def test_header_prefix(front):
    for value in ("bo", "bob", "bobby tables"):
        assert chosen(front, "/h/prefix", [("x-user", value)]) == "hdr-prefix", value
    for value in ("Bob", "ob", "abob", ""):
        assert chosen(front, "/h/prefix", [("x-user", value)]) == "default", value
    assert chosen(front, "/h/prefix") == "default"


def test_header_regex_is_a_full_match(front):
    for value in ("carl42", "cz00"):
        assert chosen(front, "/h/regex", [("x-user", value)]) == "hdr-regex", value
    for value in ("xcarl42", "carl423", "carl4", "c42", "Carl42"):
        assert chosen(front, "/h/regex", [("x-user", value)]) == "default", value


def test_header_presence_and_lower_cased_keys(front):
    for value in ("1", "anything", ""):
        assert chosen(front, "/h/present", [("x-flag", value)]) == "hdr-present", repr(value)
    assert chosen(front, "/h/present", [("x-flagged", "1")]) == "default"
    assert chosen(front, "/h/present") == "default"
    # the rule's key X-Upper is lower-cased; header names are case-insensitive on the wire
    for name in ("x-upper", "X-UPPER", "X-Upper"):
        assert chosen(front, "/h/upper", [(name, "v")]) == "hdr-upper", name
    assert chosen(front, "/h/upper", [("x-upper", "V")]) == "default", "values stay case-sensitive"


def test_headers_are_anded_inside_a_match_and_matches_ored(front):
    assert chosen(front, "/h/and", [("x-a", "1"), ("x-b", "77")]) == "hdr-and"
    assert chosen(front, "/h/and", [("x-a", "1")]) == "default"
    assert chosen(front, "/h/and", [("x-b", "77")]) == "default"
    assert chosen(front, "/h/and", [("x-a", "1"), ("x-b", "7x")]) == "default"
    assert chosen(front, "/h/or", [("x-a", "1")]) == "hdr-or"
    assert chosen(front, "/h/or", [("x-b", "2")]) == "hdr-or"
    assert chosen(front, "/h/or", [("x-a", "2"), ("x-b", "1")]) == "default"


def test_without_headers_prefix_and_regex(front):
    assert chosen(front, "/wo/prefix") == "without-prefix", "a missing header passes withoutHeaders"
    assert chosen(front, "/wo/prefix", [("x-env", "staging")]) == "without-prefix"
    for value in ("prod", "production"):
        assert chosen(front, "/wo/prefix", [("x-env", value)]) == "default", value
    assert chosen(front, "/wo/regex") == "without-regex"
    assert chosen(front, "/wo/regex", [("x-env", "tests")]) == "without-regex", "regex is a full match"
    for value in ("test", "text"):
        assert chosen(front, "/wo/regex", [("x-env", value)]) == "default", value


def test_port_from_the_host_header(front):
    assert chosen(front, "/p", host=HOST) == "port-80"
    assert chosen(front, "/p", host=f"{HOST}:80") == "port-80"
    assert chosen(front, "/p", host=f"{HOST}:8080") == "port-8080"
    assert chosen(front, "/p", host=f"m.{NS}:8080") == "port-8080"


def test_port_of_a_listener_bound_to_the_service_port(front):
    # the --forward listener is bound to m:8080: the Host header's port does not matter
    forward = front.ports[1]
    assert chosen(front, "/p", host=HOST, port=forward) == "port-8080"
    assert chosen(front, "/p", host=f"{HOST}:80", port=forward) == "port-8080"
    assert chosen(front, "/p", host="whatever.example", port=forward) == "port-8080"


def test_scheme_of_a_plaintext_request_is_http(front):
    assert chosen(front, "/s") == "scheme-http"
    assert chosen(front, "/s", [("x-forwarded-proto", "https")]) == "scheme-http", \
        "a client header does not change the scheme"


def test_source_namespace(env):
    proxies, _ = env
    assert chosen(proxies["frontend"], "/ns") == "ns-shop"
    assert chosen(proxies["tool"], "/ns") == "ns-ops-tool"
    # namespace ops but labels app=other: the sourceLabels half of that match fails
    assert chosen(proxies["other"], "/ns") == "default"
    # the rest of the table is the same from every namespace
    assert chosen(proxies["other"], "/h/exact", [("x-user", "alice")]) == "hdr-exact"


def test_uri_regex_ignores_the_query(front):
    assert chosen(front, "/items/12") == "uri-regex"
    assert chosen(front, "/items/12?page=3&q=/x") == "uri-regex"
    assert chosen(front, "/items/12/reviews") == "default"
    assert chosen(front, "/items/") == "default"
