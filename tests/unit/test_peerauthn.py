"""PeerAuthentication: mesh < namespace < workload < port, oldest wins, UNSET inherits."""
from __future__ import annotations

import pytest

from policy.model import (
    PeerAuthentication, PeerAuthenticationMutualTLS, Resource, SourceRef, WorkloadSelector, frozen_map,
)
from policy.peerauthn import (
    DISABLE, PERMISSIVE, STRICT, PeerAuthenticationIndex, accepts, effective_mtls_mode, resolve_mtls,
)


def pa(name, ns, mode=None, selector=None, ports=None, created=None):
    spec = PeerAuthentication(
        selector=WorkloadSelector(match_labels=frozen_map(selector)) if selector is not None else None,
        mtls=PeerAuthenticationMutualTLS(mode) if mode is not None else None,
        port_level_mtls=frozen_map({p: PeerAuthenticationMutualTLS(m) for p, m in (ports or {}).items()}))
    raw = {"metadata": {"creationTimestamp": created}} if created else {}
    return Resource("PeerAuthentication", "security.istio.io/v1", name, ns, {}, {}, spec,
                    SourceRef("pa.yaml", 1), raw)


MESH_STRICT = pa("default", "istio-system", "STRICT")
MESH_PERMISSIVE = pa("default", "istio-system", "PERMISSIVE")
FOO_PERMISSIVE = pa("default", "foo", "PERMISSIVE")
FOO_DISABLE = pa("default", "foo", "DISABLE")
FOO_UNSET = pa("unset", "foo", "UNSET")
# Istio reference: strict for finance workloads, but port 8080 plaintext
FINANCE = pa("finance", "foo", "STRICT", {"app": "finance"}, {8080: "DISABLE"})
FINANCE_UNSET_PORT = pa("finance", "foo", "STRICT", {"app": "finance"}, {8080: "UNSET"})
FINANCE_INHERIT = pa("finance", "foo", None, {"app": "finance"}, {8080: "DISABLE"})
APP = {"app": "finance", "version": "v1"}
OTHER_APP = {"app": "web"}

CASES = [
    # (id, policies, namespace, labels, port, expected mode, expected deciding policy)
    ("no-policy-is-permissive", [], "foo", APP, None, PERMISSIVE, None),
    ("mesh-strict", [MESH_STRICT], "foo", APP, None, STRICT, "istio-system/default"),
    ("namespace-overrides-mesh", [MESH_STRICT, FOO_PERMISSIVE], "foo", APP, None, PERMISSIVE, "foo/default"),
    ("namespace-only-own-namespace", [FOO_DISABLE], "bar", APP, None, PERMISSIVE, None),
    ("namespace-unset-inherits-mesh", [MESH_STRICT, FOO_UNSET], "foo", OTHER_APP, None, STRICT,
     "istio-system/default"),
    ("workload-overrides-namespace", [FOO_PERMISSIVE, FINANCE], "foo", APP, None, STRICT, "foo/finance"),
    ("workload-selector-miss", [FOO_PERMISSIVE, FINANCE], "foo", OTHER_APP, None, PERMISSIVE, "foo/default"),
    ("port-level-disable", [MESH_STRICT, FINANCE], "foo", APP, 8080, DISABLE, "foo/finance"),
    ("other-port-workload-mode", [MESH_STRICT, FINANCE], "foo", APP, 9090, STRICT, "foo/finance"),
    ("port-unset-inherits-workload", [FOO_DISABLE, FINANCE_UNSET_PORT], "foo", APP, 8080, STRICT, "foo/finance"),
    ("workload-unset-inherits-namespace", [FOO_DISABLE, FINANCE_INHERIT], "foo", APP, 9090, DISABLE,
     "foo/default"),
    ("workload-unset-port-explicit", [FOO_PERMISSIVE, FINANCE_INHERIT], "foo", APP, 8080, DISABLE, "foo/finance"),
    ("root-namespace-selector-ignored",
     [MESH_PERMISSIVE, pa("sel", "istio-system", "STRICT", {"app": "finance"})], "foo", APP, None,
     PERMISSIVE, "istio-system/default"),
    ("root-namespace-selector-ignored-for-root-workloads",
     [pa("sel", "istio-system", "STRICT", {"app": "finance"})], "istio-system", APP, None, PERMISSIVE, None),
    ("empty-match-labels-is-namespace-wide", [pa("ns", "foo", "STRICT", {})], "foo", OTHER_APP, None, STRICT,
     "foo/ns"),
    ("port-level-without-selector-ignored", [pa("ns", "foo", "PERMISSIVE", None, {8080: "STRICT"})], "foo",
     APP, 8080, PERMISSIVE, "foo/ns"),
    ("oldest-namespace-policy-wins-by-order", [FOO_DISABLE, pa("later", "foo", "STRICT")], "foo", APP, None,
     DISABLE, "foo/default"),
    ("oldest-wins-by-timestamp",
     [pa("new", "foo", "STRICT", created="2024-05-01T00:00:00Z"),
      pa("old", "foo", "DISABLE", created="2023-01-01T00:00:00Z")], "foo", APP, None, DISABLE, "foo/old"),
    ("oldest-workload-policy-wins",
     [pa("w2", "foo", "PERMISSIVE", {"app": "finance"}, created="2024-02-01T00:00:00Z"),
      pa("w1", "foo", "STRICT", {"version": "v1"}, created="2024-01-01T00:00:00Z")], "foo", APP, None,
     STRICT, "foo/w1"),
    ("root-namespace-custom", [pa("default", "mesh-root", "STRICT")], "foo", APP, None, STRICT,
     "mesh-root/default"),
]


@pytest.mark.parametrize("policies,ns,labels,port,mode,policy", [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_effective_mode_table(policies, ns, labels, port, mode, policy):
    root = "mesh-root" if any(p.namespace == "mesh-root" for p in policies) else "istio-system"
    d = resolve_mtls(policies, ns, labels, port, root)
    assert (d.mode, d.policy) == (mode, policy), d.reason
    assert effective_mtls_mode(policies, ns, labels, port, root) == mode


@pytest.mark.parametrize("mode,is_mtls,ok", [
    (STRICT, True, True), (STRICT, False, False),
    (PERMISSIVE, True, True), (PERMISSIVE, False, True),
    (DISABLE, False, True), (DISABLE, True, True),   # ambient: the mesh tunnel is always accepted
])
def test_accepts(mode, is_mtls, ok):
    assert accepts(mode, is_mtls) is ok


def test_index_uses_snapshot_root_and_caches():
    class Snap:
        root_namespace = "mesh-root"
        peer_authentications = (pa("default", "mesh-root", "STRICT"), FINANCE)
    idx = PeerAuthenticationIndex(Snap())
    assert idx.mode("foo", APP) == STRICT
    assert idx.mode("foo", APP, 8080) == DISABLE
    assert idx.mode("bar", {}) == STRICT
    assert idx.decision("foo", APP) is idx.decision("foo", dict(reversed(list(APP.items()))))
    assert "port" in resolve_mtls(Snap(), "foo", APP, 8080).level


def test_reason_text():
    assert resolve_mtls([], "foo", {}).reason == "PERMISSIVE: no PeerAuthentication applies (Istio's default)"
    assert resolve_mtls([MESH_STRICT], "foo", {}).reason == \
        "STRICT: set by mesh-level PeerAuthentication istio-system/default"
