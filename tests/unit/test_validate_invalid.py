"""Invalid inputs: every error names file, line, object and field path.

Each case is a YAML document with the offending line marked ``#<``; the test
checks the exact ``shop.yaml:<line>: <Kind> <ns>/<name>: <path>: `` prefix and
a fragment of the message.
"""
from __future__ import annotations

import textwrap

import pytest

from policy.loader import load_text

VS = """\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: reviews
  namespace: shop
spec:
"""
DR = VS.replace("VirtualService", "DestinationRule")
SE = VS.replace("VirtualService", "ServiceEntry")
WE = VS.replace("VirtualService", "WorkloadEntry")
AP = VS.replace("networking.istio.io/v1", "security.istio.io/v1").replace("VirtualService", "AuthorizationPolicy")
PA = VS.replace("networking.istio.io/v1", "security.istio.io/v1").replace("VirtualService", "PeerAuthentication")

ROUTE = """\
  hosts: [reviews]
  http:
  - route:
    - destination:
        host: reviews
"""

# (id, header, body, path, message fragment)
CASES = [
    ("weight-negative", VS, """\
  hosts: [reviews]
  http:
  - route:
    - destination: {host: reviews, subset: v1}
      weight: 105
    - destination: {host: reviews, subset: v2}
      weight: -5   #<
""", "spec.http[0].route[1].weight", "must be >= 0, got -5"),
    ("weights-total-zero", VS, """\
  hosts: [reviews]
  http:
  - route:   #<
    - destination: {host: reviews, subset: v1}
    - destination: {host: reviews, subset: v2}
      weight: 0
""", "spec.http[0].route", "total destination weight = 0"),
    ("unknown-field", VS, """\
  hosts: [reviews]
  http:
  - rout:   #<
    - destination: {host: reviews}
""", "spec.http[0].rout", 'unknown field "rout" (did you mean "route"?)'),
    ("duration-no-unit", VS, ROUTE + """\
    timeout: "10"   #<
""", "spec.http[0].timeout", 'missing unit in duration "10"'),
    ("duration-int", VS, ROUTE + """\
    timeout: 10   #<
""", "spec.http[0].timeout", "must be a duration with a unit"),
    ("duration-negative", VS, ROUTE + """\
    timeout: -1s   #<
""", "spec.http[0].timeout", "must not be negative"),
    ("duration-bad-unit", VS, ROUTE + """\
    timeout: 1x   #<
""", "spec.http[0].timeout", 'invalid duration "1x"'),
    ("regex-uri", VS, """\
  hosts: [reviews]
  http:
  - match:
    - uri:
        regex: "^/(?=api)"   #<
    route:
    - destination: {host: reviews}
""", "spec.http[0].match[0].uri.regex", "invalid RE2 regular expression"),
    ("regex-header", VS, """\
  hosts: [reviews]
  http:
  - match:
    - headers:
        x-user:
          regex: "(a"   #<
    route:
    - destination: {host: reviews}
""", "spec.http[0].match[0].headers[x-user].regex", "invalid RE2 regular expression"),
    ("stringmatch-two-kinds", VS, """\
  hosts: [reviews]
  http:
  - match:
    - uri:
        exact: /a
        prefix: /b   #<
    route:
    - destination: {host: reviews}
""", "spec.http[0].match[0].uri.prefix", "only one of exact, prefix, regex"),
    ("stringmatch-empty", VS, """\
  hosts: [reviews]
  http:
  - match:
    - uri: {}   #<
    route:
    - destination: {host: reviews}
""", "spec.http[0].match[0].uri", "one of exact, prefix or regex is required"),
    ("destination-host-missing", VS, """\
  hosts: [reviews]
  http:
  - route:
    - destination:   #<
        subset: v1
""", "spec.http[0].route[0].destination.host", "required field is missing"),
    ("destination-port-zero", VS, """\
  hosts: [reviews]
  http:
  - route:
    - destination:
        host: reviews
        port:
          number: 0   #<
""", "spec.http[0].route[0].destination.port.number", "between 1 and 65535, got 0"),
    ("match-port-range", VS, """\
  hosts: [reviews]
  http:
  - match:
    - port: 70000   #<
    route:
    - destination: {host: reviews}
""", "spec.http[0].match[0].port", "between 1 and 65535, got 70000"),
    ("abort-status", VS, ROUTE + """\
    fault:
      abort:
        httpStatus: 600   #<
        percentage: {value: 10}
""", "spec.http[0].fault.abort.httpStatus", "between 200 and 599, got 600"),
    ("fault-percentage", VS, ROUTE + """\
    fault:
      delay:
        fixedDelay: 1s
        percentage:
          value: 100.5   #<
""", "spec.http[0].fault.delay.percentage.value", "must be <= 100, got 100.5"),
    ("fault-legacy-percent", VS, ROUTE + """\
    fault:
      delay:
        fixedDelay: 1s
        percent: 101   #<
""", "spec.http[0].fault.delay.percent", "must be <= 100, got 101"),
    ("redirect-code", VS, """\
  hosts: [reviews]
  http:
  - redirect:
      uri: /new
      redirectCode: 200   #<
""", "spec.http[0].redirect.redirectCode", "must be a 3xx HTTP redirect code, got 200"),
    ("redirect-and-route", VS, ROUTE + """\
    redirect:   #<
      uri: /new
""", "spec.http[0].redirect", "cannot contain both route and redirect"),
    ("hosts-missing", VS.replace("spec:\n", "spec:   #<\n"), """\
  http:
  - route:
    - destination: {host: reviews}
""", "spec.hosts", "at least one host is required"),
    ("hosts-not-a-list", VS, """\
  hosts: reviews   #<
  http:
  - route:
    - destination: {host: reviews}
""", "spec.hosts", 'must be a list, got "reviews"'),
    ("mirror-percentage", VS, ROUTE + """\
    mirror: {host: reviews, subset: v2}
    mirrorPercentage:
      value: 120   #<
""", "spec.http[0].mirrorPercentage.value", "must be <= 100, got 120"),
    ("retry-attempts", VS, ROUTE + """\
    retries:
      attempts: -1   #<
""", "spec.http[0].retries.attempts", "must be >= 0, got -1"),
    ("retry-on", VS, ROUTE + """\
    retries:
      attempts: 2
      retryOn: 5xx,sometimes   #<
""", "spec.http[0].retries.retryOn", '"sometimes" is not a valid retryOn policy'),
    ("wildcard-host-mesh", VS, """\
  hosts:
  - "*"   #<
  http:
  - route:
    - destination: {host: reviews}
""", "spec.hosts[0]", 'wildcard host "*" is not allowed'),
    ("header-name", VS, ROUTE + """\
    headers:
      request:
        set:
          "bad header": x   #<
""", "spec.http[0].headers.request.set[bad header]", 'invalid HTTP header name "bad header"'),
    ("cors-method", VS, ROUTE + """\
    corsPolicy:
      allowMethods:
      - FETCH   #<
""", "spec.http[0].corsPolicy.allowMethods[0]", '"FETCH" is not a supported HTTP method'),
    ("tcp-route-missing", VS, """\
  hosts: [reviews]
  tcp:
  - match:   #<
    - port: 27017
""", "spec.tcp[0].route", "TCP route is required"),
    ("tls-sni-not-subset", VS, """\
  hosts: [api.example.com]
  tls:
  - match:
    - sniHosts:
      - other.example.com   #<
    route:
    - destination: {host: api.example.com}
""", "spec.tls[0].match[0].sniHosts[0]", "is not a compatible subset"),
    ("bool-type", VS, """\
  hosts: [reviews]
  http:
  - match:
    - ignoreUriCase: "yes"   #<
    route:
    - destination: {host: reviews}
""", "spec.http[0].match[0].ignoreUriCase", 'must be true or false, got "yes"'),
    ("subset-name-invalid", VS, """\
  hosts: [reviews]
  http:
  - route:
    - destination:
        host: reviews
        subset: V1_x   #<
""", "spec.http[0].route[0].destination.subset", 'invalid subset name "V1_x"'),
    ("export-to", VS, ROUTE + """\
  exportTo:
  - Not_A_Namespace   #<
""", "spec.exportTo[0]", 'must be ".", "*", "~" or a namespace name'),
    ("duplicate-spec-field", VS, """\
  hosts: [reviews]
  hosts: [ratings]   #<
  http:
  - route:
    - destination: {host: reviews}
""", "spec.hosts", 'duplicate field "hosts"'),
    # ---- DestinationRule
    ("dr-host-missing", DR.replace("spec:\n", "spec:   #<\n"), """\
  subsets:
  - name: v1
    labels: {version: v1}
""", "spec.host", "required field is missing"),
    ("dr-lb-enum", DR, """\
  host: reviews
  trafficPolicy:
    loadBalancer:
      simple: FASTEST   #<
""", "spec.trafficPolicy.loadBalancer.simple", 'must be one of UNSPECIFIED, LEAST_CONN'),
    ("dr-lb-oneof", DR, """\
  host: reviews
  trafficPolicy:
    loadBalancer:
      simple: ROUND_ROBIN
      consistentHash:   #<
        useSourceIp: true
""", "spec.trafficPolicy.loadBalancer.consistentHash", "only one of simple, consistentHash may be set"),
    ("dr-max-ejection", DR, """\
  host: reviews
  trafficPolicy:
    outlierDetection:
      maxEjectionPercent: 120   #<
""", "spec.trafficPolicy.outlierDetection.maxEjectionPercent", "must be <= 100, got 120"),
    ("dr-interval-zero", DR, """\
  host: reviews
  trafficPolicy:
    outlierDetection:
      interval: 0s   #<
""", "spec.trafficPolicy.outlierDetection.interval", "duration must be at least 1ms"),
    ("dr-5xx-negative", DR, """\
  host: reviews
  trafficPolicy:
    outlierDetection:
      consecutive5xxErrors: -1   #<
""", "spec.trafficPolicy.outlierDetection.consecutive5xxErrors", "must be >= 0, got -1"),
    ("dr-legacy-consecutive-errors", DR, """\
  host: reviews
  trafficPolicy:
    outlierDetection:
      consecutiveErrors: -3   #<
""", "spec.trafficPolicy.outlierDetection.consecutiveErrors", "must be >= 0, got -3"),
    ("dr-subset-name-missing", DR, """\
  host: reviews
  subsets:
  - labels:   #<
      version: v1
""", "spec.subsets[0].name", "required field is missing"),
    ("dr-subset-duplicate", DR, """\
  host: reviews
  subsets:
  - name: v1
    labels: {version: v1}
  - name: v1   #<
    labels: {version: v2}
""", "spec.subsets[1].name", 'duplicate subset name "v1"'),
    ("dr-tls-mutual", DR, """\
  host: reviews
  trafficPolicy:
    tls:   #<
      mode: MUTUAL
      privateKey: /etc/key.pem
""", "spec.trafficPolicy.tls.clientCertificate", "required for mode MUTUAL"),
    ("dr-tls-mode", DR, """\
  host: reviews
  trafficPolicy:
    tls:
      mode: STRICT   #<
""", "spec.trafficPolicy.tls.mode", 'must be one of DISABLE, SIMPLE, MUTUAL, ISTIO_MUTUAL, got "STRICT"'),
    ("dr-empty-traffic-policy", DR, """\
  host: reviews
  trafficPolicy: {}   #<
""", "spec.trafficPolicy", "traffic policy must have at least one field"),
    ("dr-int-as-string", DR, """\
  host: reviews
  trafficPolicy:
    connectionPool:
      tcp:
        maxConnections: "10"   #<
""", "spec.trafficPolicy.connectionPool.tcp.maxConnections", 'must be an integer, got "10"'),
    ("dr-cookie-name", DR, """\
  host: reviews
  trafficPolicy:
    loadBalancer:
      consistentHash:
        httpCookie:   #<
          ttl: 30s
""", "spec.trafficPolicy.loadBalancer.consistentHash.httpCookie.name", "required field is missing"),
    ("dr-port-level-port", DR, """\
  host: reviews
  trafficPolicy:
    portLevelSettings:
    - port:
        number: 0   #<
      tls: {mode: SIMPLE}
""", "spec.trafficPolicy.portLevelSettings[0].port.number", "between 1 and 65535, got 0"),
    # ---- ServiceEntry
    ("se-hosts-missing", SE.replace("spec:\n", "spec:   #<\n"), """\
  ports:
  - {number: 80, name: http, protocol: HTTP}
""", "spec.hosts", "at least one host is required"),
    ("se-ports-missing", SE.replace("spec:\n", "spec:   #<\n"), """\
  hosts: [catalog.shop.svc.cluster.local]
""", "spec.ports", "at least one port is required"),
    ("se-port-number", SE, """\
  hosts: [catalog.shop.svc.cluster.local]
  ports:
  - number: 70000   #<
    name: http
""", "spec.ports[0].number", "between 1 and 65535, got 70000"),
    ("se-port-name-missing", SE, """\
  hosts: [catalog.shop.svc.cluster.local]
  ports:
  - number: 80   #<
    protocol: HTTP
""", "spec.ports[0].name", "required field is missing"),
    ("se-resolution-enum", SE, """\
  hosts: [catalog.shop.svc.cluster.local]
  ports: [{number: 80, name: http}]
  resolution: DYNAMIC   #<
""", "spec.resolution", 'must be one of NONE, STATIC, DNS, DNS_ROUND_ROBIN, got "DYNAMIC"'),
    ("se-static-hostname", SE, """\
  hosts: [catalog.shop.svc.cluster.local]
  ports: [{number: 80, name: http}]
  resolution: STATIC
  endpoints:
  - address: catalog.example.com   #<
""", "spec.endpoints[0].address", "must be an IP address with resolution STATIC"),
    ("se-endpoint-port-name", SE, """\
  hosts: [catalog.shop.svc.cluster.local]
  ports: [{number: 80, name: http}]
  resolution: STATIC
  endpoints:
  - address: 127.0.1.1
    ports:
      grpc: 9000   #<
""", "spec.endpoints[0].ports[grpc]", 'port name "grpc" is not defined'),
    ("se-address", SE, """\
  hosts: [catalog.shop.svc.cluster.local]
  addresses:
  - 300.1.1.1   #<
  ports: [{number: 80, name: http}]
""", "spec.addresses[0]", '"300.1.1.1" is not a valid IP address or CIDR block'),
    ("se-protocol", SE, """\
  hosts: [catalog.shop.svc.cluster.local]
  ports:
  - number: 80
    name: http
    protocol: SPDY   #<
""", "spec.ports[0].protocol", 'unsupported protocol "SPDY"'),
    # ---- WorkloadEntry
    ("we-address-missing", WE.replace("spec:\n", "spec:   #<\n"), """\
  labels:
    app: catalog
""", "spec.address", "required field is missing"),
    ("we-port-zero", WE, """\
  address: 127.0.1.1
  ports:
    http: 0   #<
""", "spec.ports[http]", "between 1 and 65535, got 0"),
    # ---- AuthorizationPolicy
    ("ap-action", AP, """\
  action: PERMIT   #<
""", "spec.action", 'must be one of ALLOW, DENY, AUDIT, CUSTOM, got "PERMIT"'),
    ("ap-custom-provider", AP.replace("spec:\n", "spec:   #<\n"), """\
  action: CUSTOM
  rules:
  - to:
    - operation: {paths: [/admin]}
""", "spec.provider", "required when action is CUSTOM"),
    ("ap-ports", AP, """\
  rules:
  - to:
    - operation:
        ports: ["http"]   #<
""", "spec.rules[0].to[0].operation.ports[0]", 'must be a port number between 1 and 65535, got "http"'),
    ("ap-ports-int", AP, """\
  rules:
  - to:
    - operation:
        ports:
        - 8080   #<
""", "spec.rules[0].to[0].operation.ports[0]", "must be a string, got integer 8080"),
    ("ap-when-key", AP, """\
  rules:
  - when:
    - key: request.colour   #<
      values: [blue]
""", "spec.rules[0].when[0].key", 'unknown attribute "request.colour"'),
    ("ap-ip-block", AP, """\
  rules:
  - from:
    - source:
        ipBlocks: ["10.0.0.0/33"]   #<
""", "spec.rules[0].from[0].source.ipBlocks[0]", "is not a valid IP address or CIDR block"),
    ("ap-from-without-source", AP, """\
  rules:
  - from:
    - {}   #<
""", "spec.rules[0].from[0].source", "required field is missing"),
    ("ap-source-empty", AP, """\
  rules:
  - from:
    - source: {}   #<
""", "spec.rules[0].from[0].source", "source must not be empty"),
    # ---- PeerAuthentication
    ("pa-mode", PA, """\
  mtls:
    mode: REQUIRED   #<
""", "spec.mtls.mode", 'must be one of UNSET, DISABLE, PERMISSIVE, STRICT, got "REQUIRED"'),
    ("pa-port-level-no-selector", PA, """\
  mtls: {mode: STRICT}
  portLevelMtls:   #<
    8080: {mode: DISABLE}
""", "spec.portLevelMtls", "cannot have port level mTLS"),
    ("pa-port-key", PA, """\
  selector:
    matchLabels: {app: reviews}
  portLevelMtls:
    0:   #<
      mode: DISABLE
""", "spec.portLevelMtls[0]", "between 1 and 65535, got 0"),
    ("selector-wildcard", PA, """\
  selector:
    matchLabels:
      app: "rev*"   #<
""", "spec.selector.matchLabels[app]", 'wildcard "*" is not allowed'),
]

# more of Istio's webhook rules
CASES += [
    ("vs-no-routes", VS.replace("spec:\n", "spec:   #<\n"), """\
  hosts: [reviews]
""", "spec", "one of http, tcp or tls routes is required"),
    ("vs-duplicate-hosts", VS, """\
  hosts:
  - "*.shop.svc.cluster.local"
  - reviews.shop.svc.cluster.local   #<
  http:
  - route:
    - destination: {host: reviews}
""", "spec.hosts[1]", "duplicate hosts in virtual service"),
    ("vs-gateway-name", VS, ROUTE + """\
  gateways:
  - "shop/Bad_Gateway"   #<
""", "spec.gateways[0]", 'invalid gateway "shop/Bad_Gateway"'),
    ("vs-destination-star", VS, """\
  hosts: [reviews]
  http:
  - route:
    - destination:
        host: "*"   #<
""", "spec.http[0].route[0].destination.host", 'invalid destination host "*"'),
    ("redirect-empty", VS, """\
  hosts: [reviews]
  http:
  - redirect: {redirectCode: 301}   #<
""", "spec.http[0].redirect", "redirect must specify uri, authority, scheme or port"),
    ("redirect-port-and-derive", VS, """\
  hosts: [reviews]
  http:
  - redirect:
      port: 8080
      derivePort: FROM_REQUEST_PORT   #<
""", "spec.http[0].redirect.derivePort", "only one of port, derivePort may be set"),
    ("rewrite-empty", VS, ROUTE + """\
    rewrite: {}   #<
""", "spec.http[0].rewrite", "rewrite must specify uri, authority or uriRegexRewrite"),
    ("rewrite-uri-and-regex", VS, ROUTE + """\
    rewrite:
      uri: /a
      uriRegexRewrite:   #<
        match: ^/b
        rewrite: /c
""", "spec.http[0].rewrite.uriRegexRewrite", "cannot contain both uri and uriRegexRewrite"),
    ("rewrite-regex-invalid", VS, ROUTE + """\
    rewrite:
      uriRegexRewrite:
        match: "(?<name>x"   #<
        rewrite: /c
""", "spec.http[0].rewrite.uriRegexRewrite.match", "invalid RE2 regular expression"),
    ("direct-response-status", VS, """\
  hosts: [reviews]
  http:
  - directResponse:
      status: 999   #<
      body: {string: nope}
""", "spec.http[0].directResponse.status", "between 200 and 599, got 999"),
    ("delay-without-fixed-delay", VS, ROUTE + """\
    fault:
      delay:   #<
        percentage: {value: 5}
""", "spec.http[0].fault.delay.fixedDelay", "required field is missing"),
    ("delay-exponential", VS, ROUTE + """\
    fault:
      delay:
        exponentialDelay: 1s   #<
""", "spec.http[0].fault.delay.exponentialDelay", "exponentialDelay is not supported"),
    ("abort-grpc-status", VS, ROUTE + """\
    fault:
      abort:
        grpcStatus: TEAPOT   #<
""", "spec.http[0].fault.abort.grpcStatus", 'gRPC status "TEAPOT" is not supported'),
    ("prefix-empty", VS, """\
  hosts: [reviews]
  http:
  - match:
    - uri:
        prefix: ""   #<
    route:
    - destination: {host: reviews}
""", "spec.http[0].match[0].uri.prefix", "prefix string match should not be empty"),
    ("regex-too-long", VS, """\
  hosts: [reviews]
  http:
  - match:
    - uri:
        regex: "REGEX"   #<
    route:
    - destination: {host: reviews}
""".replace("REGEX", "a" * 1100), "spec.http[0].match[0].uri.regex", "regex is too large"),
    ("retry-backoff", VS, ROUTE + """\
    retries:
      attempts: 2
      backoff: 0s   #<
""", "spec.http[0].retries.backoff", "duration must be at least 1ms"),
    ("redirect-scheme", VS, """\
  hosts: [reviews]
  http:
  - redirect:
      uri: /x
      scheme: ftp   #<
""", "spec.http[0].redirect.scheme", 'must be "http" or "https"'),
    ("regex-rewrite-empty", VS, ROUTE + """\
    rewrite:
      uriRegexRewrite:
        match: ""   #<
        rewrite: /x
""", "spec.http[0].rewrite.uriRegexRewrite.match", "needs both match and rewrite"),
    ("header-pseudo", VS, ROUTE + """\
    headers:
      request:
        set:
          ":path": /x   #<
""", "spec.http[0].headers.request.set[:path]", 'header cannot have ":" prefix'),
    ("header-pseudo-response", VS, ROUTE + """\
    headers:
      response:
        add:
          ":authority": x   #<
""", "spec.http[0].headers.response.add[:authority]", 'header cannot have ":" prefix'),
    ("se-dns-rr-endpoints", SE, """\
  hosts: [db.example.com]
  ports: [{number: 5432, name: tcp-pg, protocol: TCP}]
  resolution: DNS_ROUND_ROBIN
  endpoints:   #<
  - address: a.db.example.com
  - address: b.db.example.com
""", "spec.endpoints", "0 or 1 endpoint with resolution DNS_ROUND_ROBIN"),
    ("we-unix-ports", WE, """\
  address: unix:///var/run/app.sock
  ports:   #<
    http: 80
""", "spec.ports", "must not include ports"),
    ("we-address-invalid", WE, """\
  address: "not an address"   #<
""", "spec.address", "is not a valid IP address or FQDN"),
    ("abort-http2", VS, ROUTE + """\
    fault:
      abort:
        http2Error: REFUSED_STREAM   #<
""", "spec.http[0].fault.abort.http2Error", "HTTP/2 abort fault injection is not supported"),
    ("fault-empty", VS, ROUTE + """\
    fault: {}   #<
""", "spec.http[0].fault", "fault injection must have an abort and/or a delay"),
    ("mirror-and-mirrors", VS, ROUTE + """\
    mirror: {host: reviews}
    mirrors:   #<
    - destination: {host: ratings}
""", "spec.http[0].mirrors", "cannot contain both mirror and mirrors"),
    ("mirror-percent-legacy", VS, ROUTE + """\
    mirror: {host: reviews}
    mirrorPercent: 101   #<
""", "spec.http[0].mirrorPercent", "must be <= 100, got 101"),
    ("retry-attempts-zero", VS, ROUTE + """\
    retries:
      attempts: 0   #<
      perTryTimeout: 2s
""", "spec.http[0].retries.attempts", "attempts is 0"),
    ("timeout-sub-ms", VS, ROUTE + """\
    timeout: 500us   #<
""", "spec.http[0].timeout", "duration must be at least 1ms"),
    ("tls-route-no-match", VS, """\
  hosts: [api.example.com]
  tls:
  - route:   #<
    - destination: {host: api.example.com}
""", "spec.tls[0].match", "TLS route must have at least one match condition"),
    ("tcp-weights", VS, """\
  hosts: [mongo]
  tcp:
  - route:   #<
    - destination: {host: mongo, subset: a}
    - destination: {host: mongo, subset: b}
""", "spec.tcp[0].route", "total destination weight = 0"),
    ("tcp-weight-negative", VS, """\
  hosts: [mongo]
  tcp:
  - route:
    - destination: {host: mongo, subset: a}
      weight: -1   #<
""", "spec.tcp[0].route[0].weight", "must be >= 0, got -1"),
    ("dr-consistent-hash-empty", DR, """\
  host: reviews
  trafficPolicy:
    loadBalancer:
      consistentHash: {}   #<
""", "spec.trafficPolicy.loadBalancer.consistentHash", "consistentHash needs one of"),
    ("dr-ring-size-conflict", DR, """\
  host: reviews
  trafficPolicy:
    loadBalancer:
      consistentHash:
        useSourceIp: true
        minimumRingSize: 1024   #<
        ringHash: {minimumRingSize: 2048}
""", "spec.trafficPolicy.loadBalancer.consistentHash.minimumRingSize", "cannot be set together with ringHash"),
    ("dr-locality-total", DR, """\
  host: reviews
  trafficPolicy:
    loadBalancer:
      localityLbSetting:
        distribute:
        - from: us-west/*
          to:   #<
            "us-west/*": 50
            "us-east/*": 20
""", "spec.trafficPolicy.loadBalancer.localityLbSetting.distribute[0].to", "total locality weight 70 != 100"),
    ("dr-istio-mutual-certs", DR, """\
  host: reviews
  trafficPolicy:
    tls:
      mode: ISTIO_MUTUAL
      clientCertificate: /etc/cert.pem   #<
""", "spec.trafficPolicy.tls.clientCertificate", "cannot be set when mode is ISTIO_MUTUAL"),
    ("dr-pool-empty", DR, """\
  host: reviews
  trafficPolicy:
    connectionPool: {}   #<
""", "spec.trafficPolicy.connectionPool", "connection pool must have at least one of tcp or http"),
    ("dr-port-level-duplicate", DR, """\
  host: reviews
  trafficPolicy:
    portLevelSettings:
    - port: {number: 80}
      tls: {mode: SIMPLE}
    - port: {number: 80}   #<
      tls: {mode: DISABLE}
""", "spec.trafficPolicy.portLevelSettings[1].port", "duplicate port 80"),
    ("se-none-with-endpoints", SE, """\
  hosts: [catalog.shop.svc.cluster.local]
  ports: [{number: 80, name: http}]
  endpoints:   #<
  - address: 127.0.1.1
""", "spec.endpoints", "no endpoints may be given with resolution NONE"),
    ("se-multiple-hosts-tcp", SE, """\
  hosts: [a.example.com, b.example.com]
  ports:
  - number: 27017
    name: mongo
    protocol: TCP   #<
  resolution: DNS
""", "spec.ports[0].protocol", "multiple hosts with a non-HTTP, non-TLS port"),
    ("se-cidr-with-dns", SE, """\
  hosts: [db.example.com]
  addresses:   #<
  - 10.0.0.0/24
  ports: [{number: 5432, name: tcp-pg, protocol: TCP}]
  resolution: DNS
""", "spec.addresses", "CIDR addresses are allowed only with resolution NONE or STATIC"),
    ("se-dns-short-host", SE, """\
  hosts:
  - catalog   #<
  ports: [{number: 80, name: http}]
  resolution: DNS
""", "spec.hosts[0]", "hosts must be fully qualified"),
    ("se-selector-and-endpoints", SE, """\
  hosts: [catalog.shop.svc.cluster.local]
  ports: [{number: 80, name: http}]
  resolution: STATIC
  workloadSelector:   #<
    labels: {app: catalog}
  endpoints:
  - address: 127.0.1.1
""", "spec.workloadSelector", "only one of workloadSelector or endpoints may be set"),
    ("se-duplicate-port", SE, """\
  hosts: [catalog.shop.svc.cluster.local]
  ports:
  - {number: 80, name: http}
  - {number: 80, name: http-alt}   #<
""", "spec.ports[1].number", "port 80 already defined"),
    ("ap-selector-and-target", AP, """\
  selector:
    matchLabels: {app: reviews}
  targetRef:   #<
    kind: Service
    name: reviews
""", "spec.targetRef", "only one of selector or targetRef(s) may be set"),
    ("ap-provider-without-custom", AP, """\
  action: DENY
  provider:   #<
    name: ext-authz
""", "spec.provider", "may only be set when action is CUSTOM"),
    ("ap-when-no-values", AP, """\
  rules:
  - when:
    - key: source.ip   #<
""", "spec.rules[0].when[0]", "at least one of values or notValues must be set"),
    ("ap-when-port-value", AP, """\
  rules:
  - when:
    - key: destination.port
      values: ["http"]   #<
""", "spec.rules[0].when[0].values[0]", 'must be a port number between 1 and 65535, got "http"'),
    ("ap-empty-value", AP, """\
  rules:
  - to:
    - operation:
        paths: [""]   #<
""", "spec.rules[0].to[0].operation.paths[0]", "empty value is not allowed"),
    ("ap-target-ref-namespace", AP, """\
  targetRef:
    kind: Service
    name: reviews
    namespace: other   #<
""", "spec.targetRef.namespace", "cross-namespace targetRef is not allowed"),
    ("we-port-name", WE, """\
  address: 127.0.1.1
  ports:
    HTTP_1: 8080   #<
""", "spec.ports[HTTP_1]", 'invalid port name "HTTP_1"'),
]

META_CASES = [
    ("name-dns1123", """\
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: Bad_Name   #<
  namespace: shop
spec:
  host: reviews
""", "DestinationRule shop/Bad_Name", "metadata.name", 'invalid name "Bad_Name"'),
    ("namespace-dns1123", """\
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: reviews
  namespace: Shop   #<
spec:
  host: reviews
""", "DestinationRule Shop/reviews", "metadata.namespace", 'invalid namespace "Shop"'),
    ("label-value", """\
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: reviews
  namespace: shop
  labels:
    team: "two words"   #<
spec:
  host: reviews
""", "DestinationRule shop/reviews", "metadata.labels[team]", 'invalid label value "two words"'),
    ("top-level-unknown", """\
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: reviews
  namespace: shop
specs:   #<
  host: reviews
""", "DestinationRule shop/reviews", "specs", 'unknown field "specs"'),
    ("metadata-unknown", """\
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: reviews
  namespace: shop
  lables: {a: b}   #<
spec:
  host: reviews
""", "DestinationRule shop/reviews", "metadata.lables", 'unknown field "lables"'),
    ("kind-not-in-group", """\
apiVersion: networking.istio.io/v1
kind: Virtualservice   #<
metadata:
  name: reviews
  namespace: shop
spec:
  hosts: [reviews]
""", "Virtualservice shop/reviews", "kind", 'kind "Virtualservice" does not exist in API group networking.istio.io'),
    ("version-not-served", """\
apiVersion: security.istio.io/v1alpha3   #<
kind: AuthorizationPolicy
metadata:
  name: reviews
  namespace: shop
spec: {}
""", "AuthorizationPolicy shop/reviews", "apiVersion", 'security.istio.io has no version "v1alpha3"'),
    ("metadata-name-missing", """\
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:   #<
  namespace: shop
spec:
  host: reviews
""", "DestinationRule", "metadata.name", 'missing required field "name"'),
]


def _marked_line(text: str) -> int:
    lines = [i + 1 for i, line in enumerate(text.splitlines()) if "#<" in line]
    assert len(lines) == 1, "each case marks exactly one line"
    return lines[0]


def _check(text: str, obj: str, path: str, fragment: str) -> None:
    line = _marked_line(text)
    res = load_text(text, "shop.yaml")
    assert res.resources == [], "a document with errors yields no resources"
    prefix = f"shop.yaml:{line}: {obj}: {path}: "
    msgs = [str(e) for e in res.errors]
    hits = [mm for mm in msgs if mm.startswith(prefix)]
    assert hits, f"no error starting with {prefix!r}; got:\n" + "\n".join(msgs)
    assert any(fragment in h for h in hits), f"{fragment!r} not in {hits}"


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_invalid_spec(case):
    _id, header, body, path, fragment = case
    text = header + textwrap.dedent(body) if not body.startswith("  ") else header + body
    kind = header.split("kind: ")[1].split("\n")[0]
    _check(text, f"{kind} shop/reviews", path, fragment)


@pytest.mark.parametrize("case", META_CASES, ids=[c[0] for c in META_CASES])
def test_invalid_metadata_and_kind(case):
    _id, text, obj, path, fragment = case
    _check(text, obj, path, fragment)


def test_istio_warnings_load():
    text = VS + ROUTE + """\
    fault:
      abort:
        percentage: {value: 5}
    headers:
      request:
        set: {":authority": reviews-v2, host: reviews-v2}
"""
    res = load_text(text, "shop.yaml")
    assert res.errors == [] and len(res.resources) == 1
    assert [str(w) for w in res.warnings] == [
        "shop.yaml:13: warning: VirtualService shop/reviews: spec.http[0].fault.abort: abort configured, but no "
        "httpStatus (or grpcStatus) is set: it aborts nothing"]
    se_text = SE + """\
  hosts: ["*foo.example.com"]
  ports: [{number: 80, name: http}]
  workloadSelector: {labels: {app: x}}
"""
    res = load_text(se_text, "se.yaml")
    assert res.errors == []
    assert sorted(w.path for w in res.warnings) == ["spec.hosts[0]", "spec.workloadSelector"]
    we_text = WE + "  network: vpc-2\n"
    res = load_text(we_text, "we.yaml")
    assert res.errors == [] and "address is unset" in str(res.warnings[0])


def test_case_count():
    assert len(CASES) + len(META_CASES) >= 35


def test_the_brief_example_exactly():
    text = "# the shop's reviews\n" + VS + """\
  hosts: [reviews]
  http:
  - route:
    - destination: {host: reviews, subset: v1}
      weight: 105
    - destination: {host: reviews, subset: v2}
      weight: -5
"""
    res = load_text(text, "shop.yaml")
    assert [str(e) for e in res.errors] == [
        "shop.yaml:14: VirtualService shop/reviews: spec.http[0].route[1].weight: must be >= 0, got -5"]


def test_weights_are_proportions_with_a_portability_warning():
    # Istio 1.17+ accepts any non-negative weights (relative); older releases wanted 100
    text = VS + """\
  hosts: [reviews]
  http:
  - route:
    - destination: {host: reviews, subset: v1}
      weight: 150
    - destination: {host: reviews, subset: v2}
      weight: 50
"""
    res = load_text(text, "shop.yaml")
    assert res.errors == [] and len(res.resources) == 1
    (w,) = res.warnings
    assert str(w).startswith("shop.yaml:9: warning: VirtualService shop/reviews: spec.http[0].route: "
                             "total destination weight 200 != 100")
    one_dest = VS + "  hosts: [reviews]\n  http:\n  - route:\n    - destination: {host: reviews}\n      weight: 30\n"
    res = load_text(one_dest, "shop.yaml")
    assert res.errors == [] and res.warnings == []


def test_all_errors_of_a_file_are_reported():
    text = VS + """\
  hosts: [reviews]
  http:
  - route:
    - destination: {host: reviews}
    timeout: 10
    retries: {attempts: -1}
---
""" + DR + """\
  host: reviews
  trafficPolicy:
    loadBalancer: {simple: FASTEST}
    outlierDetection: {maxEjectionPercent: 101, interval: 1x}
"""
    res = load_text(text, "shop.yaml")
    paths = {e.path for e in res.errors}
    assert {"spec.http[0].timeout", "spec.http[0].retries.attempts",
            "spec.trafficPolicy.loadBalancer.simple", "spec.trafficPolicy.outlierDetection.maxEjectionPercent",
            "spec.trafficPolicy.outlierDetection.interval"} <= paths
    lines = [e.line for e in res.errors]
    assert lines == sorted(lines), "errors are reported in file order"
