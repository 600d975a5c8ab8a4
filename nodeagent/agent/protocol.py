"""The enrollment wire protocol on ``<state-dir>/agent.sock``.

Newline-delimited JSON, one request per line, one reply line per request, on
a unix stream socket. This is the call a CNI plugin makes.

Requests::

    {"op": "enroll", "kind": "netns"|"cgroup", "target": "...", "name": "...",
     "namespace": "...", "service_account": "...", "labels": {...}, "ips": [...],
     "wait": false}
    {"op": "unenroll", "kind": "netns"|"cgroup", "target": "..."}
    {"op": "unenroll", "namespace": "...", "name": "..."}   (CNI DEL without a netns)
    {"op": "list"}

Replies: ``{"ok": true, ...}`` or ``{"ok": false, "error": "..."}``. An
enroll reply carries ``result`` (added / unchanged / updated), ``identity``,
``capture`` (applied / pending / none) and, when pending, ``capture_error``.
An enroll whose netns/cgroup does not exist is refused unless ``wait`` is
true (the target is expected to appear; it is captured when it does).
Pure: parsing and encoding only.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from nodeagent.agent.workload import KINDS, SpecError, WorkloadSpec, normalize_target, spec_from_json

MAX_LINE = 64 * 1024
OPS = ("enroll", "unenroll", "list")


class ProtocolError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class Request:
    op: str
    spec: WorkloadSpec | None = None  # enroll
    wait: bool = False  # enroll: accept a target that does not exist yet
    key: tuple[str, str] | None = None  # unenroll by (kind, target)
    workload: tuple[str, str] | None = None  # unenroll by (namespace, name)


def encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":"), sort_keys=True).encode() + b"\n"


def decode(line: bytes, limit: int | None = MAX_LINE) -> dict[str, Any]:
    if limit is not None and len(line) > limit:
        raise ProtocolError(f"message longer than {MAX_LINE} bytes")
    try:
        message = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"not a JSON line: {exc}") from None
    if not isinstance(message, dict):
        raise ProtocolError("a message must be a JSON object")
    return message


def parse_request(line: bytes) -> Request:
    message = decode(line)
    op = message.get("op")
    if op not in OPS:
        raise ProtocolError(f"op must be one of {', '.join(OPS)}, got {op!r}")
    try:
        if op == "enroll":
            wait = message.get("wait", False)
            if not isinstance(wait, bool):
                raise SpecError(f"wait must be true or false, got {wait!r}")
            return Request(op, spec=spec_from_json({k: v for k, v in message.items() if k not in ("op", "wait")}),
                           wait=wait)
        if op == "unenroll" and "target" not in message and "kind" not in message:
            namespace, name = message.get("namespace"), message.get("name")
            if not isinstance(namespace, str) or not namespace or not isinstance(name, str) or not name:
                raise SpecError("give kind and target, or namespace and name")
            return Request(op, workload=(namespace, name))
        if op == "unenroll":
            kind, target = message.get("kind"), message.get("target")
            if kind not in KINDS:
                raise SpecError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
            if not isinstance(target, str) or not target:
                raise SpecError("target is required")
            return Request(op, key=(kind, normalize_target(kind, target)))
    except SpecError as exc:
        raise ProtocolError(f"{op}: {exc}") from None
    return Request(op)


def enroll_request(spec_fields: dict[str, Any], wait: bool = False) -> dict[str, Any]:
    return {"op": "enroll", **spec_fields, **({"wait": True} if wait else {})}


def unenroll_request(kind: str, target: str) -> dict[str, Any]:
    return {"op": "unenroll", "kind": kind, "target": target}


def ok(**fields: Any) -> dict[str, Any]:
    return {"ok": True, **fields}


def error(message: str) -> dict[str, Any]:
    return {"ok": False, "error": message}
