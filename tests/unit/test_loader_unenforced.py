"""Fields that load but that nodeagent does not enforce: one warning per file naming
file:line, object and field; none for the fields the proxy applies."""
from __future__ import annotations

from nodeagent.store import ConfigStore
from policy.loader import load_text
from policy.schema import UNENFORCED_FIELDS, check_schema_consistency

VS = """\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: x
  namespace: prod
spec:
  hosts: [x]
  http:
  - match:
    - uri: {prefix: /a}
      statPrefix: a
    route:
    - destination: {host: x}
  - retries:
      attempts: 2
      retryRemoteLocalities: true
      retryIgnorePreviousHosts: false
    route:
    - destination: {host: x}
"""

DR_TLS = """\
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: ext
  namespace: prod
spec:
  host: api.example.com
  trafficPolicy:
    connectionPool:
      tcp:
        tcpKeepalive: {time: 10s}
"""


def warnings(text: str, file: str = "f.yaml") -> list[str]:
    res = load_text(text, file)
    assert res.errors == [], "\n".join(map(str, res.errors))
    return [str(w) for w in res.warnings]


def test_one_unenforced_field_is_one_warning_naming_file_line_object_and_field():
    text = VS.split("  - retries:")[0]
    assert warnings(text, "prod.yaml") == [
        "prod.yaml:11: warning: VirtualService prod/x: spec.http[0].match[0].statPrefix: "
        "loaded but not enforced by nodeagent"]


def test_several_in_one_file_are_one_warning():
    text = VS + "---\n" + DR_TLS
    assert warnings(text) == [
        "f.yaml:11: warning: VirtualService prod/x: spec.http[0].match[0].statPrefix: "
        "loaded but not enforced by nodeagent; "
        "also spec.http[1].retries.retryRemoteLocalities (line 16), "
        "spec.http[1].retries.retryIgnorePreviousHosts (line 17), "
        "DestinationRule prod/ext spec.trafficPolicy.connectionPool.tcp.tcpKeepalive (line 31)"]
    res = load_text(text, "f.yaml")
    assert [(d.line, d.obj, d.path) for d in res.unenforced] == [
        (11, "VirtualService prod/x", "spec.http[0].match[0].statPrefix"),
        (16, "VirtualService prod/x", "spec.http[1].retries.retryRemoteLocalities"),
        (17, "VirtualService prod/x", "spec.http[1].retries.retryIgnorePreviousHosts"),
        (31, "DestinationRule prod/ext", "spec.trafficPolicy.connectionPool.tcp.tcpKeepalive")]
    assert len(res.resources) == 2          # a warning, not an error: the objects load


def test_deep_paths_subsets_and_port_levels():
    text = """\
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: r, namespace: shop}
spec:
  host: r
  subsets:
  - name: v1
    labels: {version: v1}
    trafficPolicy:
      connectionPool:
        tcp: {tcpKeepalive: {time: 10s}}
  trafficPolicy:
    portLevelSettings:
    - port: {number: 80}
      loadBalancer:
        simple: ROUND_ROBIN
        localityLbSetting: {enabled: true}
"""
    res = load_text(text, "d.yaml")
    assert [(d.line, d.path) for d in res.unenforced] == [
        (11, "spec.subsets[0].trafficPolicy.connectionPool.tcp.tcpKeepalive"),
        (17, "spec.trafficPolicy.portLevelSettings[0].loadBalancer.localityLbSetting")]


def test_values_that_match_what_nodeagent_does_are_not_warned():
    text = """\
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: r, namespace: shop}
spec:
  host: r
  trafficPolicy:
    tls: {mode: ISTIO_MUTUAL}
    loadBalancer:
      simple: LEAST_REQUEST
      localityLbSetting: {enabled: false}
    connectionPool:
      http: {h2UpgradePolicy: DO_NOT_UPGRADE, useClientProtocol: false}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: r, namespace: shop}
spec:
  hosts: [r]
  http:
  - retries: {attempts: 2, retryRemoteLocalities: false, retryIgnorePreviousHosts: true}
    route:
    - destination: {host: r}
"""
    assert warnings(text) == []


def test_applied_fields_are_not_warned():
    """Everything here is enforced by the proxy (HTTP/1.1, HTTP/2 and gRPC, TCP and TLS routes)."""
    text = """\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: r, namespace: shop}
spec:
  hosts: [r]
  http:
  - match:
    - headers: {end-user: {exact: jason}}
      uri: {prefix: /api}
      queryParams: {q: {exact: "1"}}
      withoutHeaders: {x-test: {}}
      sourceLabels: {app: web}
    rewrite: {uri: /v2}
    headers:
      request: {set: {x-a: b}}
    timeout: 2s
    retries: {attempts: 3, perTryTimeout: 1s, retryOn: "5xx,reset", backoff: 50ms}
    corsPolicy:
      allowOrigins: [{exact: "https://example.com"}]
      allowMethods: [GET]
    fault:
      delay: {fixedDelay: 1s, percentage: {value: 10}}
      abort: {httpStatus: 503, percentage: {value: 1}}
    mirror: {host: r-shadow}
    mirrorPercentage: {value: 5}
    route:
    - destination: {host: r, subset: v2}
      weight: 90
    - destination: {host: r, subset: v1}
      weight: 10
  - directResponse: {status: 404}
  tcp:
  - match: [{port: 3306}]
    route: [{destination: {host: db, port: {number: 3306}}}]
  tls:
  - match: [{sniHosts: [r]}]
    route: [{destination: {host: r}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: r, namespace: shop}
spec:
  host: r
  trafficPolicy:
    loadBalancer:
      consistentHash: {httpCookie: {name: s, ttl: 60s}}
    connectionPool:
      tcp: {maxConnections: 10, connectTimeout: 1s, idleTimeout: 1h}
      http: {http1MaxPendingRequests: 5, http2MaxRequests: 100, maxRequestsPerConnection: 10,
             idleTimeout: 30s}
    outlierDetection: {consecutive5xxErrors: 5, interval: 10s, baseEjectionTime: 30s,
                       maxEjectionPercent: 50}
    tls: {mode: DISABLE}
  subsets:
  - name: v1
    labels: {version: v1}
  - name: v2
    labels: {version: v2}
"""
    assert warnings(text) == []


def test_the_table_names_real_schema_fields():
    assert check_schema_consistency() == []
    assert ("TCPSettings", "tcpKeepalive") in UNENFORCED_FIELDS
    assert ("ClientTLSSettings", "mode") not in UNENFORCED_FIELDS   # SIMPLE/MUTUAL are originated
    assert ("HTTPRoute", "corsPolicy") not in UNENFORCED_FIELDS      # applied by the proxy (policy/cors.py)


def test_the_store_reports_it_with_the_other_warnings(tmp_path):
    (tmp_path / "vs.yaml").write_text(VS.split("  - retries:")[0])
    s = ConfigStore(tmp_path)
    s.load()
    assert [str(w) for w in s.last_warnings] == [
        f"{tmp_path}/vs.yaml:11: warning: VirtualService prod/x: spec.http[0].match[0].statPrefix: "
        "loaded but not enforced by nodeagent"]


def test_tls_origination_fields_are_enforced_and_credential_name_warns():
    text = """\
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: ext, namespace: prod}
spec:
  host: api.example.com
  trafficPolicy:
    tls:
      mode: SIMPLE
      sni: api.example.com
      subjectAltNames: [api.example.com]
      caCertificates: /etc/ca.pem
      insecureSkipVerify: false
  subsets:
  - name: v1
    labels: {version: v1}
    trafficPolicy:
      tls:
        mode: SIMPLE
        credentialName: api-secret
"""
    assert warnings(text) == [
        "f.yaml:19: warning: DestinationRule prod/ext: spec.subsets[0].trafficPolicy.tls.credentialName: "
        "Kubernetes Secret 'api-secret' cannot be read by nodeagent: connections to this destination fail "
        "(503 UF), as Istio's do when the secret is missing; use caCertificates, clientCertificate and "
        "privateKey files instead"]


def test_ca_crl_is_enforced_and_only_warned_when_nothing_is_verified():
    text = DR_TLS.replace("""    connectionPool:
      tcp:
        tcpKeepalive: {time: 10s}
""", """    tls: {mode: SIMPLE, caCertificates: /etc/ca.pem, caCrl: /etc/crl.pem}
  subsets:
  - name: v1
    labels: {version: v1}
    trafficPolicy:
      tls: {mode: SIMPLE, insecureSkipVerify: true, caCrl: /etc/crl.pem}
""")
    assert warnings(text) == [
        "f.yaml:14: warning: DestinationRule prod/ext: spec.subsets[0].trafficPolicy.tls.caCrl: "
        "ignored: insecureSkipVerify is true, the server certificate is not verified"]


def test_sni_and_sans_under_istio_mutual_are_ignored_with_a_warning():
    text = DR_TLS.replace("""    connectionPool:
      tcp:
        tcpKeepalive: {time: 10s}
""", """    tls:
      mode: ISTIO_MUTUAL
      sni: a.example.com
""")
    assert warnings(text) == [
        "f.yaml:11: warning: DestinationRule prod/ext: spec.trafficPolicy.tls.sni: ignored with mode "
        "ISTIO_MUTUAL (the mesh tunnel checks the identity the workload directory gives)"]
