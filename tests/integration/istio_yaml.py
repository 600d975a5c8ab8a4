"""Istio YAML for integration tests through the real proxy: a service made of a
ServiceEntry plus one WorkloadEntry per endpoint, a VirtualService without retries (or any VirtualService and DestinationRule),
and the calling workload (``--workload shop/frontend``)."""
from __future__ import annotations

NS = "shop"


def fqdn(name: str, ns: str = NS) -> str:
    return f"{name}.{ns}.svc.cluster.local"


def service(name: str, endpoints, *, protocol: str = "HTTP", port_name: str = "http", number: int = 80) -> str:
    """A MESH_INTERNAL ServiceEntry for ``name`` (port ``number``) selecting one
    WorkloadEntry per (host, port) of ``endpoints``."""
    out = [f"""---
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
  - number: {number}
    name: {port_name}
    protocol: {protocol}
  workloadSelector:
    labels:
      app: {name}
"""]
    for i, (host, port) in enumerate(endpoints):
        out.append(f"""---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata:
  name: {name}-{i}
  namespace: {NS}
spec:
  address: {host}
  ports:
    {port_name}: {port}
  labels:
    app: {name}
""")
    return "".join(out)


def virtual_service(name: str, host: str, http: str) -> str:
    """A VirtualService ``name`` for ``host`` whose ``http:`` list is the YAML text ``http``
    (indented as under ``spec.http``)."""
    return f"""---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: {name}
  namespace: {NS}
spec:
  hosts:
  - {host}
  http:
{http}"""


def destination_rule(name: str, host: str, body: str) -> str:
    """A DestinationRule ``name`` for ``host``; ``body`` is the YAML of the rest of its spec."""
    return f"""---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: {name}
  namespace: {NS}
spec:
  host: {host}
{body}"""


def no_retries(name: str) -> str:
    return virtual_service(name, fqdn(name), f"""  - retries:
      attempts: 0
    route:
    - destination:
        host: {fqdn(name)}
""")


FRONTEND = f"""---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata:
  name: frontend
  namespace: {NS}
spec:
  address: 127.0.0.1
  serviceAccount: frontend
  labels:
    app: frontend
"""
