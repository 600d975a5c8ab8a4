"""Enrolled workloads as plain data: the spec, its identity, validation and
the merge with WorkloadEntry objects from the config snapshot.

Pure: no I/O. A netns target is kept as the user gave it, normalised so the
same namespace written as ``pod1`` or ``/var/run/netns/pod1`` is one target.
"""
from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Iterable, Mapping

KINDS = ("netns", "cgroup")
NETNS_DIRS = ("/var/run/netns/", "/run/netns/")

# Kubernetes object names and namespaces (DNS-1123 label / subdomain), and
# label keys/values as Kubernetes accepts them.
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
_LABEL_NAME = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)$")
_LABEL_PREFIX = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?)$")
_NETNS_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,255}$")


class SpecError(ValueError):
    """A workload spec field is invalid; the message names the field."""


@dataclass(frozen=True, slots=True)
class WorkloadSpec:
    """One enrolled workload: a pod's network namespace or a host cgroup."""

    kind: str
    target: str
    name: str
    namespace: str
    service_account: str
    labels: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    ips: tuple[str, ...] = ()
    ports: tuple[int, ...] = ()  # cgroup workloads: the host ports they serve (inbound capture)

    @property
    def key(self) -> tuple[str, str]:
        """What the workload occupies on the node: at most one workload each."""
        return (self.kind, self.target)

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name} ({self.kind} {self.target})"

    def identity(self, trust_domain: str) -> str:
        return spiffe_id(trust_domain, self.namespace, self.service_account)

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "target": self.target,
            "name": self.name,
            "namespace": self.namespace,
            "service_account": self.service_account,
            "labels": dict(self.labels),
            "ips": list(self.ips),
            **({"ports": list(self.ports)} if self.ports else {}),
        }


def spiffe_id(trust_domain: str, namespace: str, service_account: str) -> str:
    return f"spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}"


def normalize_target(kind: str, target: str) -> str:
    """``pod1``, ``/var/run/netns/pod1`` and ``/run/netns/pod1`` are one netns."""
    if kind == "netns":
        for prefix in NETNS_DIRS:
            if target.startswith(prefix) and "/" not in target[len(prefix):]:
                return target[len(prefix):]
        return target
    if kind == "cgroup":
        # cgroup v2 paths are relative to the unified hierarchy root.
        for prefix in ("/sys/fs/cgroup/", "/sys/fs/cgroup"):
            if target.startswith(prefix):
                target = target[len(prefix):]
                break
        return "/" + target.strip("/")
    raise SpecError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")


def netns_path(target: str) -> str:
    """The file that holds a netns target (a bare name lives in /var/run/netns)."""
    return target if "/" in target else NETNS_DIRS[0] + target


def spec_from_json(data: Any) -> WorkloadSpec:
    """Validate a JSON object (the wire form and the state-file form)."""
    if not isinstance(data, Mapping):
        raise SpecError(f"workload must be a JSON object, got {type(data).__name__}")
    unknown = sorted(set(data) - {"kind", "target", "name", "namespace", "service_account", "labels", "ips",
                                  "ports", "op"})
    if unknown:
        raise SpecError(f"unknown field(s): {', '.join(unknown)}")

    def text(name: str, default: str | None = None) -> str:
        value = data.get(name, default)
        if value is None or value == "":
            raise SpecError(f"{name} is required")
        if not isinstance(value, str):
            raise SpecError(f"{name} must be a string, got {type(value).__name__}")
        return value

    kind = text("kind")
    if kind not in KINDS:
        raise SpecError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    target = normalize_target(kind, text("target"))
    if kind == "netns" and "/" not in target and not _NETNS_NAME.match(target):
        raise SpecError(f"target: {target!r} is not a valid network namespace name")
    if kind == "netns" and "/" in target and not target.startswith("/"):
        raise SpecError(f"target: netns path {target!r} must be absolute")
    if ".." in target.split("/"):
        raise SpecError(f"target: {target!r} must not contain '..'")
    name = text("name")
    if not _DNS_SUBDOMAIN.match(name):
        raise SpecError(f"name: {name!r} is not a valid Kubernetes name (lower-case DNS-1123)")
    namespace = text("namespace")
    if not _DNS_LABEL.match(namespace):
        raise SpecError(f"namespace: {namespace!r} is not a valid Kubernetes namespace (lower-case DNS-1123 label)")
    service_account = text("service_account", "default")
    if not _DNS_SUBDOMAIN.match(service_account):
        raise SpecError(f"service_account: {service_account!r} is not a valid Kubernetes name")
    labels = validate_labels(data.get("labels") or {})
    ips = validate_ips(data.get("ips") or [])
    ports = validate_ports(data.get("ports") or [])
    if ports and kind != "cgroup":
        raise SpecError("ports: only cgroup (host-mode) workloads declare ports; "
                        "a pod's inbound traffic is captured on every port")
    return WorkloadSpec(kind, target, name, namespace, service_account, labels, ips, ports)


def validate_ports(raw: Any) -> tuple[int, ...]:
    if not isinstance(raw, (list, tuple)):
        raise SpecError("ports must be a list of TCP port numbers")
    out: list[int] = []
    for value in raw:
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
            raise SpecError(f"ports: {value!r} is not a TCP port number (1-65535)")
        if value not in out:
            out.append(value)
    return tuple(sorted(out))


def parse_ports(text: str) -> list[int]:
    """The CLI form ``8080,9090`` (empty string: no ports)."""
    ports: list[int] = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        try:
            ports.append(int(item))
        except ValueError:
            raise SpecError(f"ports: {item!r} is not a port number; write them as 8080,9090") from None
    return ports


def validate_labels(raw: Any) -> Mapping[str, str]:
    if not isinstance(raw, Mapping):
        raise SpecError("labels must be an object of string keys and values")
    out: dict[str, str] = {}
    for key, value in raw.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise SpecError(f"labels: {key!r}: keys and values must be strings")
        prefix, _, name = key.rpartition("/")
        if not _LABEL_NAME.match(name) or (prefix and not _LABEL_PREFIX.match(prefix)):
            raise SpecError(f"labels: {key!r} is not a valid label key")
        if not _LABEL_VALUE.match(value) or len(value) > 63:
            raise SpecError(f"labels: {key}={value!r} is not a valid label value")
        out[key] = value
    return MappingProxyType(dict(sorted(out.items())))


def validate_ips(raw: Any) -> tuple[str, ...]:
    if isinstance(raw, str):
        raw = [raw]
    if not isinstance(raw, (list, tuple)):
        raise SpecError("ips must be a list of IP addresses")
    out: list[str] = []
    for value in raw:
        try:
            address = str(ipaddress.ip_address(value))
        except (ValueError, TypeError):
            raise SpecError(f"ips: {value!r} is not an IP address") from None
        if address not in out:
            out.append(address)
    return tuple(out)


def parse_labels(text: str) -> dict[str, str]:
    """The CLI form ``k=v,k2=v2`` (empty string: no labels)."""
    labels: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SpecError(f"labels: {item!r} must be written key=value")
        labels[key.strip()] = value.strip()
    return labels


@dataclass(frozen=True, slots=True)
class MergedWorkload:
    """One workload as the node sees it: enrolled, declared by a WorkloadEntry, or both.

    When both exist for one address they are ONE workload: the enrolled
    identity and labels, the WorkloadEntry's named ports.
    """

    name: str
    namespace: str
    service_account: str
    labels: Mapping[str, str]
    addresses: tuple[str, ...]
    ports: Mapping[str, int]
    sources: tuple[str, ...]  # "enrolled" and/or "WorkloadEntry"
    spec: WorkloadSpec | None

    def identity(self, trust_domain: str) -> str:
        return spiffe_id(trust_domain, self.namespace, self.service_account)


def merge_workloads(snapshot_workloads: Iterable[Any], enrolled: Iterable[WorkloadSpec]) -> tuple[MergedWorkload, ...]:
    """Enrolled workloads first (ordered by namespace/name), then the
    WorkloadEntry workloads that no enrolled workload shares an address with.

    ``snapshot_workloads`` are the snapshot's ``WorkloadRef`` values (name,
    namespace, service_account, labels, address, ports).
    """
    specs = sorted(enrolled, key=lambda s: (s.namespace, s.name, s.kind, s.target))
    by_address: dict[str, int] = {}
    merged: list[dict[str, Any]] = []
    for spec in specs:
        for ip in spec.ips:
            by_address[ip] = len(merged)
        merged.append({"spec": spec, "ports": {}, "sources": ["enrolled"], "addresses": list(spec.ips)})
    extra: list[MergedWorkload] = []
    for ref in snapshot_workloads:
        address = str(ref.address) if ref.address else ""
        index = by_address.get(_canonical_ip(address))
        if index is not None:
            entry = merged[index]
            for port_name, number in dict(ref.ports or {}).items():
                entry["ports"].setdefault(port_name, number)
            if "WorkloadEntry" not in entry["sources"]:
                entry["sources"].append("WorkloadEntry")
            continue
        extra.append(MergedWorkload(
            name=ref.name, namespace=ref.namespace,
            service_account=ref.service_account or "default",
            labels=MappingProxyType(dict(ref.labels or {})),
            addresses=(address,) if address else (),
            ports=MappingProxyType(dict(ref.ports or {})),
            sources=("WorkloadEntry",), spec=None,
        ))
    result = [
        MergedWorkload(
            name=e["spec"].name, namespace=e["spec"].namespace,
            service_account=e["spec"].service_account, labels=e["spec"].labels,
            addresses=tuple(e["addresses"]), ports=MappingProxyType(dict(sorted(e["ports"].items()))),
            sources=tuple(e["sources"]), spec=e["spec"],
        )
        for e in merged
    ]
    return tuple(result + extra)


def _canonical_ip(address: str) -> str:
    try:
        return str(ipaddress.ip_address(address))
    except ValueError:
        return address
