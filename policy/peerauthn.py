"""PeerAuthentication: which inbound transport a workload accepts.

Pure. Mirrors Istio's ``ComposePeerAuthentication``
(pilot/pkg/security/authn): "It should have the setting from the most narrow
scope (i.e workload-level is preferred over namespace-level, which is
preferred over mesh-level). When there are more than one policy in the same
scope (i.e workload-level), the oldest one win. UNSET will be replaced with
the setting from the parent. I.e UNSET port-level config will be replaced
with config from workload-level, UNSET in workload-level config will be
replaced with one in namespace-level and so on." With no policy at all the
mode is PERMISSIVE.

- mesh-wide: in the root namespace, without a selector (or with empty
  ``matchLabels``);
- namespace-wide: in the workload's namespace, without a selector;
- workload: in the workload's namespace, ``selector.matchLabels`` a subset of
  the workload's labels. "PeerAuthentication policies with workload
  selectors are ignored when deployed in the root namespace."
- ``portLevelMtls`` is keyed by the workload's (target) port, "not the port of
  the Kubernetes service", and is honoured only on a policy with a selector.

"Oldest" is ``metadata.creationTimestamp`` when the object carries one,
otherwise the order in which resources were loaded (earlier = older).

DISABLE: in Istio ambient, "ztunnel and HBONE always enforce mTLS", so a
DISABLE policy does not refuse the mesh's own mTLS tunnel. nodeagent does the
same: DISABLE accepts plaintext *and* tunnel connections (refusing an
authenticated connection would add no security); only STRICT refuses
plaintext.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

__all__ = [
    "STRICT", "PERMISSIVE", "DISABLE", "UNSET", "MtlsDecision",
    "effective_mtls_mode", "resolve_mtls", "accepts", "PeerAuthenticationIndex",
]

STRICT = "STRICT"
PERMISSIVE = "PERMISSIVE"
DISABLE = "DISABLE"
UNSET = "UNSET"
_MODES = (STRICT, PERMISSIVE, DISABLE)
DEFAULT_ROOT_NAMESPACE = "istio-system"


@dataclass(frozen=True, slots=True)
class MtlsDecision:
    """The mode for a workload port, and why."""
    mode: str                       # STRICT | PERMISSIVE | DISABLE
    policy: str | None              # "namespace/name" that set the mode; None for the default
    level: str                      # "default" | "mesh" | "namespace" | "workload" | "port"
    port_modes: Mapping[int, str]   # the workload policy's portLevelMtls, UNSET resolved

    @property
    def reason(self) -> str:
        if self.policy is None:
            return f"{self.mode}: no PeerAuthentication applies (Istio's default)"
        return f"{self.mode}: set by {self.level}-level PeerAuthentication {self.policy}"


def _mode_of(mtls) -> str | None:
    """The mode written in a MutualTLS message, or None for UNSET/absent (inherit)."""
    if mtls is None:
        return None
    mode = (mtls.mode or UNSET).upper()
    return mode if mode in _MODES else None


def _has_selector(spec) -> bool:
    return spec.selector is not None and bool(spec.selector.match_labels)


def _age_key(res, index: int) -> tuple:
    """Older first: creationTimestamp (RFC 3339, sorts as text) if present, else load order."""
    raw = getattr(res, "raw", None) or {}
    meta = raw.get("metadata") if isinstance(raw, Mapping) else None
    ts = meta.get("creationTimestamp") if isinstance(meta, Mapping) else None
    if ts:
        return (0, str(ts), index)
    return (1, "", index)


def _resources_of(snapshot_or_resources) -> tuple:
    pas = getattr(snapshot_or_resources, "peer_authentications", None)
    if pas is None:
        pas = snapshot_or_resources
    return tuple(r for r in pas if getattr(r, "kind", "PeerAuthentication") == "PeerAuthentication")


def _root_of(snapshot_or_resources, root_namespace: str | None) -> str:
    if root_namespace is not None:
        return root_namespace
    return getattr(snapshot_or_resources, "root_namespace", None) or DEFAULT_ROOT_NAMESPACE


def resolve_mtls(snapshot_or_resources, namespace: str, labels: Mapping[str, str],
                 port: int | None = None, root_namespace: str | None = None) -> MtlsDecision:
    """The effective mode for a workload (and target port), with the deciding policy.

    ``snapshot_or_resources`` is a ConfigSnapshot (its ``peer_authentications``
    and ``root_namespace`` are used) or an iterable of PeerAuthentication
    resources in load order. ``root_namespace`` overrides the snapshot's
    (default istio-system).
    """
    root_namespace = _root_of(snapshot_or_resources, root_namespace)
    mesh = ns_level = workload = None
    mesh_key = ns_key = wl_key = None
    for i, res in enumerate(_resources_of(snapshot_or_resources)):
        spec = res.spec
        key = _age_key(res, i)
        if not _has_selector(spec):
            if res.namespace == root_namespace:
                if mesh is None or key < mesh_key:
                    mesh, mesh_key = res, key
            elif res.namespace == namespace:
                if ns_level is None or key < ns_key:
                    ns_level, ns_key = res, key
        elif res.namespace == namespace and res.namespace != root_namespace:
            if all(labels.get(k) == v for k, v in spec.selector.match_labels.items()):
                if workload is None or key < wl_key:
                    workload, wl_key = res, key

    mode, policy, level = PERMISSIVE, None, "default"
    for res, lvl in ((mesh, "mesh"), (ns_level, "namespace"), (workload, "workload")):
        if res is None:
            continue
        m = _mode_of(res.spec.mtls)
        if m is not None:
            mode, policy, level = m, f"{res.namespace}/{res.name}", lvl
    port_modes: dict[int, str] = {}
    if workload is not None:
        for p, mtls in workload.spec.port_level_mtls.items():
            port_modes[int(p)] = _mode_of(mtls) or mode
    if port is not None and port in port_modes:
        explicit = _mode_of(workload.spec.port_level_mtls.get(port))
        if explicit is not None:
            return MtlsDecision(explicit, f"{workload.namespace}/{workload.name}", "port", port_modes)
    return MtlsDecision(mode, policy, level, port_modes)


def effective_mtls_mode(snapshot_or_resources, namespace: str, labels: Mapping[str, str],
                        port: int | None = None, root_namespace: str | None = None) -> str:
    """"STRICT" | "PERMISSIVE" | "DISABLE" for inbound traffic to ``port`` of the workload."""
    return resolve_mtls(snapshot_or_resources, namespace, labels, port, root_namespace).mode


def accepts(mode: str, is_mtls: bool) -> bool:
    """Whether a connection is admitted: STRICT refuses plaintext; the rest accept both.

    DISABLE still accepts the mesh's mTLS tunnel (as Istio ambient does).
    """
    if is_mtls:
        return True
    return mode != STRICT


class PeerAuthenticationIndex:
    """Resolved modes per workload for one snapshot, cached (the proxy asks per connection)."""

    def __init__(self, snapshot_or_resources, root_namespace: str | None = None):
        self._resources = _resources_of(snapshot_or_resources)
        self._root = _root_of(snapshot_or_resources, root_namespace)
        self._cache: dict[tuple, MtlsDecision] = {}

    def decision(self, namespace: str, labels: Mapping[str, str]) -> MtlsDecision:
        key = (namespace, frozenset(labels.items()))
        d = self._cache.get(key)
        if d is None:
            d = resolve_mtls(self._resources, namespace, labels, None, self._root)
            self._cache[key] = d
        return d

    def mode(self, namespace: str, labels: Mapping[str, str], port: int | None = None) -> str:
        d = self.decision(namespace, labels)
        if port is not None:
            return d.port_modes.get(port, d.mode)
        return d.mode

