"""Decode YAML nodes into ``policy.model`` objects and validate them as Istio does.

Two layers, both collecting every error (never stopping at the first):

1. structural, like the Kubernetes API server with Istio's CRD schemas:
   unknown fields, wrong types, bad enums, bad durations, missing required
   fields, out-of-range integers;
2. semantic, mirroring Istio's validation webhook (``pkg/config/validation``):
   weights, percentages, ports, status codes, RE2 regexes, host names,
   conflicting fields, and so on.

Every error names the line of the offending field and its path
(``spec.http[0].route[1].weight``). Semantic checks of a message run only
when its subtree decoded cleanly, so one mistake does not cascade.
Pure: no I/O.
"""
from __future__ import annotations

import dataclasses
import functools
import http
import ipaddress
import re
from typing import Any, Callable

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from policy import model as m
from policy.duration import DurationError, parse_duration
from policy.errors import Diagnostic
from policy.schema import (
    MESSAGES, UNENFORCED_FIELDS, Enum, ListOf, MapOf, Message, Msg, Scalar, Special, py_name,
)

__all__ = ["Ctx", "INVALID", "decode", "decode_spec", "node_type_name", "scalar_value",
           "is_dns1123_label", "is_dns1123_subdomain", "validate_labels"]


class _Invalid:
    def __repr__(self) -> str:
        return "INVALID"


INVALID: Any = _Invalid()

_TAG = "tag:yaml.org,2002:"
_constructor = yaml.constructor.SafeConstructor()


def scalar_value(node: ScalarNode) -> Any:
    tag = node.tag
    if tag == _TAG + "str":
        return node.value
    if tag == _TAG + "int":
        return _constructor.construct_yaml_int(node)
    if tag == _TAG + "float":
        return _constructor.construct_yaml_float(node)
    if tag == _TAG + "bool":
        return _constructor.construct_yaml_bool(node)
    if tag == _TAG + "null":
        return None
    return node.value


def node_type_name(node: Node) -> str:
    if isinstance(node, MappingNode):
        return "an object"
    if isinstance(node, SequenceNode):
        return "a list"
    t = node.tag
    if t == _TAG + "int":
        return "integer"
    if t == _TAG + "float":
        return "number"
    if t == _TAG + "bool":
        return "boolean"
    if t == _TAG + "null":
        return "null"
    return "string"


def _show(node: Node) -> str:
    if isinstance(node, ScalarNode):
        kind = node_type_name(node)
        if kind == "string":
            return f'"{node.value}"'
        return f"{kind} {node.value}"
    return node_type_name(node)


def is_null(node: Node) -> bool:
    return isinstance(node, ScalarNode) and node.tag == _TAG + "null"


class Ctx:
    """Error collector for one object: file, object ref, namespace, field lines."""

    def __init__(self, file: str, obj: str | None, namespace: str = "default"):
        self.file = file
        self.obj = obj
        self.namespace = namespace
        self.errors: list[Diagnostic] = []
        self.warnings: list[Diagnostic] = []
        self.lines: dict[str, int] = {}
        # (field path, line) of fields that loaded but nodeagent does not enforce (schema.UNENFORCED_FIELDS)
        self.unenforced: list[tuple[str, int | None]] = []

    def line_of(self, path: str) -> int | None:
        p = path
        while p:
            if p in self.lines:
                return self.lines[p]
            cut = max(p.rfind("."), p.rfind("["))
            if cut <= 0:
                break
            p = p[:cut]
        return self.lines.get(p)

    def has_errors_under(self, *prefixes: str) -> bool:
        """True when an error was reported at or below one of these paths (used to avoid
        follow-on errors, e.g. a weight total when one destination failed to decode)."""
        for e in self.errors:
            p = e.path or ""
            for pre in prefixes:
                if p == pre or p.startswith(pre + ".") or p.startswith(pre + "["):
                    return True
        return False

    def err(self, path: str, message: str, line: int | None = None) -> None:
        self.errors.append(Diagnostic(self.file, line if line is not None else self.line_of(path),
                                      message, self.obj, path))

    def warn(self, path: str, message: str, line: int | None = None) -> None:
        self.warnings.append(Diagnostic(self.file, line if line is not None else self.line_of(path),
                                        message, self.obj, path, severity="warning"))


def _line(node: Node) -> int:
    return node.start_mark.line + 1


# --------------------------------------------------------------------------
# structural decoding

def decode(node: Node, ty, path: str, ctx: Ctx) -> Any:
    if isinstance(ty, Msg):
        return decode_message(node, ty.name, path, ctx)
    if isinstance(ty, Scalar):
        return _decode_scalar(node, ty.kind, path, ctx)
    if isinstance(ty, Enum):
        return _decode_enum(node, ty.values, path, ctx)
    if isinstance(ty, ListOf):
        if not isinstance(node, SequenceNode):
            ctx.err(path, f"must be a list, got {_show(node)}")
            return INVALID
        out = []
        for i, item in enumerate(node.value):
            ipath = f"{path}[{i}]"
            ctx.lines[ipath] = _line(item)
            if is_null(item):
                ctx.err(ipath, "must not be null")
                continue
            v = decode(item, ty.item, ipath, ctx)
            if v is not INVALID:
                out.append(v)
        return tuple(out)
    if isinstance(ty, MapOf):
        if not isinstance(node, MappingNode):
            ctx.err(path, f"must be an object (a map), got {_show(node)}")
            return INVALID
        out_map: dict = {}
        seen_keys: set = set()
        for knode, vnode in _merged(node):
            key = scalar_value(knode) if isinstance(knode, ScalarNode) else None
            if ty.int_keys:
                if isinstance(key, str) and key.isdigit():
                    key = int(key)
                if not isinstance(key, int) or isinstance(key, bool):
                    ctx.err(path, f"keys must be port numbers, got {_show(knode)}", _line(knode))
                    continue
            elif not isinstance(key, str):
                if isinstance(key, (int, float, bool)):
                    ctx.err(path, f"keys must be strings, got {_show(knode)} (quote it)", _line(knode))
                else:
                    ctx.err(path, f"keys must be strings, got {_show(knode)}", _line(knode))
                continue
            kpath = f"{path}[{key}]"
            if key in seen_keys:
                ctx.err(kpath, f'duplicate key "{key}"', _line(knode))
                continue
            seen_keys.add(key)
            ctx.lines[kpath] = _line(knode)
            if is_null(vnode):
                if isinstance(ty.value, Special) and ty.value.name == "string_match_or_present":
                    out_map[key] = m.StringMatch("present", "")
                    continue
                ctx.err(kpath, "must not be null")
                continue
            v = decode(vnode, ty.value, kpath, ctx)
            if v is not INVALID:
                out_map[key] = v
        return m.frozen_map(out_map)
    if isinstance(ty, Special):
        return _decode_special(node, ty.name, path, ctx)
    raise TypeError(f"unknown type descriptor {ty!r}")


def _decode_scalar(node: Node, kind: str, path: str, ctx: Ctx) -> Any:
    if not isinstance(node, ScalarNode):
        want = {"string": "a string", "bool": "true or false", "duration": 'a duration such as "10s"'}.get(
            kind, "an integer" if kind in ("uint32", "int32") else "a number")
        ctx.err(path, f"must be {want}, got {_show(node)}")
        return INVALID
    v = scalar_value(node)
    tname = node_type_name(node)
    if kind == "string":
        if tname != "string":
            ctx.err(path, f"must be a string, got {_show(node)} (quote it: \"{node.value}\")")
            return INVALID
        return v
    if kind == "bool":
        if tname != "boolean":
            ctx.err(path, f"must be true or false, got {_show(node)}")
            return INVALID
        return v
    if kind in ("uint32", "int32"):
        if tname != "integer":
            ctx.err(path, f"must be an integer, got {_show(node)}")
            return INVALID
        lo, hi = (0, 2**32 - 1) if kind == "uint32" else (-2**31, 2**31 - 1)
        if v < lo:
            ctx.err(path, f"must be >= {lo}, got {v}")
            return INVALID
        if v > hi:
            ctx.err(path, f"must be <= {hi}, got {v}")
            return INVALID
        return v
    if kind == "double":
        if tname not in ("integer", "number"):
            ctx.err(path, f"must be a number, got {_show(node)}")
            return INVALID
        return float(v)
    if kind == "duration":
        if tname in ("integer", "number"):
            ctx.err(path, f'must be a duration with a unit such as "{node.value}s" or "{node.value}ms", got {node.value}')
            return INVALID
        if tname != "string":
            ctx.err(path, f'must be a duration such as "10s", got {_show(node)}')
            return INVALID
        try:
            return parse_duration(v)
        except DurationError as exc:
            ctx.err(path, str(exc))
            return INVALID
    raise TypeError(kind)


def _decode_enum(node: Node, values: tuple[str, ...], path: str, ctx: Ctx) -> Any:
    if not isinstance(node, ScalarNode) or node_type_name(node) != "string":
        ctx.err(path, f"must be one of {', '.join(values)}, got {_show(node)}")
        return INVALID
    v = node.value
    if v not in values:
        hint = " (enum values are upper-case)" if v.upper() in values else ""
        ctx.err(path, f'must be one of {", ".join(values)}, got "{v}"{hint}')
        return INVALID
    return v


def _mapping_items(node: Node, path: str, ctx: Ctx, what: str) -> list[tuple[str, Node, Node]] | None:
    if not isinstance(node, MappingNode):
        ctx.err(path, f"must be an object{what}, got {_show(node)}")
        return None
    items = []
    seen: set[str] = set()
    for knode, vnode in _merged(node):
        if not isinstance(knode, ScalarNode) or node_type_name(knode) != "string":
            ctx.err(path, f"field names must be strings, got {_show(knode)}", _line(knode))
            continue
        key = knode.value
        if key in seen:
            ctx.err(f"{path}.{key}" if path else key, f'duplicate field "{key}"', _line(knode))
            continue
        seen.add(key)
        items.append((key, knode, vnode))
    return items


def _merged(node: MappingNode, depth: int = 0) -> list[tuple[Node, Node]]:
    """Key/value pairs with YAML merge keys (``<<: *anchor``) expanded; explicit keys win."""
    pairs = []
    merges = []
    for knode, vnode in node.value:
        if isinstance(knode, ScalarNode) and knode.tag == _TAG + "merge" and depth < 20:
            sources = vnode.value if isinstance(vnode, SequenceNode) else [vnode]
            merges.extend(src for src in sources if isinstance(src, MappingNode))
        else:
            pairs.append((knode, vnode))
    if merges:
        explicit = {k.value for k, _ in pairs if isinstance(k, ScalarNode)}
        for src in merges:
            for k, v in _merged(src, depth + 1):
                if isinstance(k, ScalarNode) and k.value not in explicit:
                    explicit.add(k.value)
                    pairs.append((k, v))
    return pairs


def _unknown(ctx: Ctx, path: str, key: str, known, line: int) -> None:
    import difflib  # only for a suggestion (0.13 MiB the agent need not keep)
    close = difflib.get_close_matches(key, list(known), n=1)
    hint = f' (did you mean "{close[0]}"?)' if close else ""
    ctx.err(f"{path}.{key}" if path else key, f'unknown field "{key}"{hint}', line)


def decode_message(node: Node, name: str, path: str, ctx: Ctx) -> Any:
    msg: Message = MESSAGES[name]
    items = _mapping_items(node, path, ctx, "")
    if items is None:
        return INVALID
    kwargs: dict[str, Any] = {}
    present: list[str] = []
    for key, knode, vnode in items:
        fpath = f"{path}.{key}" if path else key
        f = msg.fields.get(key)
        if f is None:
            _unknown(ctx, path, key, msg.fields, _line(knode))
            continue
        ctx.lines[fpath] = _line(knode)
        if is_null(vnode):
            continue
        v = decode(vnode, f.type, fpath, ctx)
        if v is INVALID:
            continue
        present.append(key)
        kwargs[py_name(key, f) if not (name == "SEWorkloadSelector") else "labels"] = v
        if (name, key) in UNENFORCED_FIELDS:
            when = UNENFORCED_FIELDS[(name, key)]
            if when is None or when(v):
                ctx.unenforced.append((fpath, ctx.lines[fpath]))
    for group in msg.oneofs:
        got = [k for k in group if k in present]
        if len(got) > 1:
            ctx.err(f"{path}.{got[1]}", f"only one of {', '.join(group)} may be set, got {' and '.join(got)}")
    missing = False
    for req in msg.required:
        if req not in present:
            missing = True
            if not ctx.has_errors_under(f"{path}.{req}"):
                ctx.err(f"{path}.{req}", "required field is missing")   # at the object's line
    if missing:
        return INVALID
    # Fields that failed to decode are left at their defaults so the semantic checks
    # below still run (every error of a file is reported); checks that aggregate
    # over a field skip it when it had errors (ctx.has_errors_under).
    try:
        obj = msg.build(kwargs) if msg.build else msg.cls(**kwargs)
    except TypeError as exc:   # a required dataclass field without a schema 'required' entry
        ctx.err(path, f"invalid object: {exc}")
        return INVALID
    check = CHECKS.get(name)
    if check is not None:
        check(obj, path, ctx)
    return obj


def _percent_problem(value: float, vnode: Node) -> str | None:
    if value < 0:
        return f"must be >= 0, got {vnode.value}"
    if value > 100:
        return f"must be <= 100, got {vnode.value}"
    return None


def _single_field_message(node: Node, path: str, ctx: Ctx, field: str, scalar_type: str, example: str,
                          problem) -> Any:
    """A wrapper message with one scalar field ({number: N}, {value: X}): the field's
    value, None when absent, INVALID after reporting; ``problem(value, vnode)``
    returns a range error or None."""
    items = _mapping_items(node, path, ctx, example)
    if items is None:
        return INVALID
    value = None
    ok = True
    for key, knode, vnode in items:
        ctx.lines[f"{path}.{key}"] = _line(knode)
        if key != field:
            _unknown(ctx, path, key, (field,), _line(knode))
            ok = False
            continue
        value = _decode_scalar(vnode, scalar_type, f"{path}.{field}", ctx)
        if value is INVALID:
            ok = False
            continue
        message = problem(value, vnode)
        if message is not None:
            ctx.err(f"{path}.{field}", message)
            ok = False
    return value if ok else INVALID


def _decode_special(node: Node, name: str, path: str, ctx: Ctx) -> Any:
    if name == "port_selector":
        return _single_field_message(
            node, path, ctx, "number", "uint32", " like {number: 9080}",
            lambda n, _: None if 1 <= n <= 65535 else f"must be a port number between 1 and 65535, got {n}")
    if name == "percent":
        value = _single_field_message(node, path, ctx, "value", "double", " like {value: 50.0}", _percent_problem)
        return 0.0 if value is None else value
    if name in ("string_match", "string_match_or_present"):
        items = _mapping_items(node, path, ctx, " with one of exact, prefix, regex")
        if items is None:
            return INVALID
        found: list[tuple[str, str]] = []
        ok = True
        for key, knode, vnode in items:
            ctx.lines[f"{path}.{key}"] = _line(knode)
            if key not in ("exact", "prefix", "regex"):
                _unknown(ctx, path, key, ("exact", "prefix", "regex"), _line(knode))
                ok = False
                continue
            if is_null(vnode):
                continue
            v = _decode_scalar(vnode, "string", f"{path}.{key}", ctx)
            if v is INVALID:
                ok = False
                continue
            found.append((key, v))
        if not ok:
            return INVALID
        if len(found) > 1:
            ctx.err(f"{path}.{found[1][0]}", f"only one of exact, prefix, regex may be set, got {found[0][0]} and {found[1][0]}")
            return INVALID
        if not found:
            if name == "string_match_or_present":
                return m.StringMatch("present", "")
            ctx.err(path, "one of exact, prefix or regex is required")
            return INVALID
        kind, value = found[0]
        if kind in ("prefix", "regex") and value == "":
            ctx.err(f"{path}.{kind}", f"{kind} string match should not be empty")
            return INVALID
        if kind == "regex":
            err = regex_error(value)
            if err:
                ctx.err(f"{path}.regex", f"invalid RE2 regular expression {value!r}: {err}")
                return INVALID
        return m.StringMatch(kind, value)
    raise TypeError(name)


def decode_spec(kind: str, node: Node, ctx: Ctx) -> Any:
    """Decode ``spec`` of an enforced kind; returns the spec object or INVALID."""
    return decode_message(node, kind, "spec", ctx)


# --------------------------------------------------------------------------
# value checkers (pure)

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_HOST_LABEL = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_]*[A-Za-z0-9])?$")
_LABEL_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_HEADER_NAME = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_HTTP_METHODS = {"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"}
_RETRY_ON = {
    "5xx", "gateway-error", "reset", "connect-failure", "envoy-ratelimited", "retriable-4xx",
    "refused-stream", "retriable-status-codes", "retriable-headers", "cancelled", "deadline-exceeded",
    "internal", "resource-exhausted", "unavailable", "reset-before-request", "http3-post-connect-failure",
}
PROTOCOLS = {"HTTP", "HTTPS", "GRPC", "GRPC-WEB", "HTTP2", "HTTP_PROXY", "MONGO", "MYSQL", "REDIS",
             "TCP", "TLS", "UDP", "THRIFT"}
_AUTHZ_KEYS = re.compile(
    r"^(request\.headers\[[^\]]+\]|source\.ip|remote\.ip|source\.namespace|source\.principal|"
    r"source\.serviceAccount|request\.auth\.principal|request\.auth\.audiences|request\.auth\.presenter|"
    r"request\.auth\.claims\[[^\]]+\](\[[^\]]+\])*|destination\.ip|destination\.port|connection\.sni|"
    r"request\.experimental\.envoy\.filters\..+|experimental\.envoy\.filters\..+)$")


def is_dns1123_label(s: str) -> bool:
    return len(s) <= 63 and bool(_DNS_LABEL.match(s))


def is_dns1123_subdomain(s: str) -> bool:
    return 0 < len(s) <= 253 and all(is_dns1123_label(p) for p in s.split("."))


@functools.cache
def _re2_options():
    """re2's options for validation, made with the first regex checked: re2 is loaded only
    when the configuration has one."""
    import re2
    options = re2.Options()
    options.log_errors = False  # no C++ log lines on stderr
    return options


def regex_error(pattern: str) -> str | None:
    """None when ``pattern`` compiles as RE2 (Istio's regex dialect), else the reason."""
    if len(pattern) > 1024:
        return f"regex is too large, max length allowed is 1024 (got {len(pattern)})"
    import re2
    try:
        re2.compile(pattern, _re2_options())
    except Exception as exc:  # re2.error and friends
        arg = exc.args[0] if exc.args else exc.__class__.__name__
        if isinstance(arg, bytes):
            arg = arg.decode("utf-8", "replace")
        return f"{arg}; Istio uses RE2 syntax (https://github.com/google/re2/wiki/Syntax)"
    return None


def wildcard_domain_error(host: str) -> str | None:
    """Istio's ValidateWildcardDomain: ``*``, ``*.example.com`` or a DNS name."""
    if not host:
        return "host must not be empty"
    if len(host) > 255:
        return f"host {host!r} is too long"
    h = host
    if h == "*":
        return None
    if h.startswith("*"):
        first, _, rest = h.partition(".")
        # Istio accepts a wildcard only in the first label: "*", "*.x", or partial "*foo.x"
        if not re.fullmatch(r"\*|\*-?[a-z0-9]([-a-z0-9]*[a-z0-9])?", first):
            return f'invalid host "{host}": a wildcard is only allowed at the start of the first label'
        if not rest:
            return None
        h = rest
    if h.endswith("."):
        h = h[:-1]
    for label in h.split("."):
        if not _HOST_LABEL.match(label) or len(label) > 63:
            return f'invalid host "{host}": each dot-separated part must be a DNS label (letters, digits, "-")'
    return None


def is_ip(s: str) -> bool:
    try:
        ipaddress.ip_address(s)
        return True
    except ValueError:
        return False


def ip_or_cidr_error(s: str) -> str | None:
    try:
        if "/" in s:
            ipaddress.ip_network(s, strict=False)
        else:
            ipaddress.ip_address(s)
    except ValueError:
        return f'"{s}" is not a valid IP address or CIDR block'
    return None


def validate_labels(labels, path: str, ctx: Ctx, selector: bool = False) -> None:
    for k, v in labels.items():
        kp = f"{path}[{k}]"
        prefix, _, name = k.rpartition("/")
        if (prefix and not is_dns1123_subdomain(prefix)) or not name or len(name) > 63 or not _LABEL_NAME.match(name):
            ctx.err(kp, f'invalid label key "{k}": must be an optional DNS prefix and "/" plus a name '
                        f"of at most 63 letters, digits, '-', '_' or '.'")
        if v and (len(v) > 63 or not _LABEL_NAME.match(v)):
            if selector and "*" in v:
                ctx.err(kp, f'wildcard "*" is not allowed in label selectors, got "{v}"')
            else:
                ctx.err(kp, f'invalid label value "{v}": at most 63 letters, digits, \'-\', \'_\' or \'.\', '
                            f"starting and ending with a letter or digit")


def _range(ctx: Ctx, path: str, v, lo=None, hi=None, what: str = "") -> bool:
    if v is None:
        return True
    if lo is not None and v < lo:
        ctx.err(path, f"{what}must be >= {lo}, got {v}")
        return False
    if hi is not None and v > hi:
        ctx.err(path, f"{what}must be <= {hi}, got {v}")
        return False
    return True


def _port(ctx: Ctx, path: str, v) -> None:
    if v is not None and not 1 <= v <= 65535:
        ctx.err(path, f"must be a port number between 1 and 65535, got {v}")


def _min_duration(ctx: Ctx, path: str, v) -> None:
    """Istio's ValidateDuration: at least 1ms, millisecond precision."""
    if v is None:
        return
    if v < 0.001:
        ctx.err(path, f"duration must be at least 1ms, got {_fmt_secs(v)}")
    elif abs(v * 1000 - round(v * 1000)) > 1e-6:
        ctx.err(path, f"only durations to millisecond precision are supported, got {_fmt_secs(v)}")


def _fmt_secs(v: float) -> str:
    return f"{v:g}s"


def _header_op_error(name: str, allow_authority: bool) -> str | None:
    """Istio's ValidateHTTPHeader(WithAuthority)OperationName."""
    if allow_authority and name.lower() in (":authority", "host"):
        return None
    if name.startswith(":"):
        return f'invalid header "{name}": header cannot have ":" prefix'
    if not _HEADER_NAME.match(name):
        return f'invalid HTTP header name "{name}"'
    return None


def _header_names(ctx: Ctx, path: str, headers: m.Headers | None) -> None:
    if headers is None:
        return
    for part in ("request", "response"):
        ops = getattr(headers, part)
        if ops is None:
            continue
        for op in ("set", "add"):
            for name in getattr(ops, op):
                e = _header_op_error(name, allow_authority=(part == "request"))
                if e:
                    ctx.err(f"{path}.{part}.{op}[{name}]", e)
        for i, name in enumerate(ops.remove):
            e = _header_op_error(name, allow_authority=False)
            if e:
                ctx.err(f"{path}.{part}.remove[{i}]", e)


def _export_to(ctx: Ctx, path: str, export_to: tuple[str, ...]) -> None:
    seen = set()
    for i, e in enumerate(export_to):
        p = f"{path}[{i}]"
        if e in seen:
            ctx.err(p, f'duplicate entry "{e}"')
        seen.add(e)
        if e not in (".", "*", "~") and not is_dns1123_label(e):
            ctx.err(p, f'must be ".", "*", "~" or a namespace name, got "{e}"')
    if "*" in seen and len(seen) > 1:
        ctx.err(path, '"*" cannot be combined with other entries')
    if "~" in seen and len(seen) > 1:
        ctx.err(path, '"~" cannot be combined with other entries')


def _gateways(ctx: Ctx, path: str, gateways: tuple[str, ...]) -> None:
    for i, g in enumerate(gateways):
        p = f"{path}[{i}]"
        if g == "mesh":
            continue
        ns, slash, name = g.partition("/")
        if slash:
            if not is_dns1123_label(ns) or not is_dns1123_label(name):
                ctx.err(p, f'invalid gateway "{g}": must be "namespace/name" with DNS-1123 labels')
        elif wildcard_domain_error(g) or g.startswith("*"):
            ctx.err(p, f'invalid gateway name "{g}"')


def _weights(ctx: Ctx, path: str, dests) -> None:
    """Istio (since 1.17, pkg/config/validation): each weight >= 0 and, with several
    destinations, a total above 0; weights are relative proportions. Istio before 1.17
    required a total of exactly 100: that is kept as a warning, so configurations
    stay portable."""
    if ctx.has_errors_under(path):
        return
    total = 0
    ok = True
    for i, d in enumerate(dests):
        ok = _range(ctx, f"{path}[{i}].weight", d.weight, 0) and ok
        total += d.weight or 0
    if not ok or len(dests) < 2:
        return
    if total == 0:
        ctx.err(path, "total destination weight = 0 (with several destinations give them weights, "
                      "e.g. 80 and 20)")
    elif total != 100:
        ctx.warn(path, f"total destination weight {total} != 100: nodeagent (like Istio 1.17+) uses the "
                       f"weights as proportions; Istio releases before 1.17 reject this")


# --------------------------------------------------------------------------
# semantic checks per message (run when the message decoded cleanly)

def _c_destination(d: m.Destination, path: str, ctx: Ctx) -> None:
    if d.host == "*":
        ctx.err(f"{path}.host", 'invalid destination host "*"')
    else:
        e = wildcard_domain_error(d.host)
        if e:
            ctx.err(f"{path}.host", e)
    if d.subset is not None and not is_dns1123_label(d.subset):
        ctx.err(f"{path}.subset", f'invalid subset name "{d.subset}": must be a DNS-1123 label '
                                  f"(lower-case letters, digits, '-')")


def _c_route_destination(d, path: str, ctx: Ctx) -> None:
    _header_names(ctx, f"{path}.headers", getattr(d, "headers", None))


def _c_match(mt: m.HTTPMatchRequest, path: str, ctx: Ctx) -> None:
    for fieldname, jname in (("headers", "headers"), ("without_headers", "withoutHeaders")):
        for name in getattr(mt, fieldname):
            if not _HEADER_NAME.match(name):
                ctx.err(f"{path}.{jname}[{name}]", f'invalid HTTP header name "{name}"')
    _port(ctx, f"{path}.port", mt.port)
    validate_labels(mt.source_labels, f"{path}.sourceLabels", ctx)
    _gateways(ctx, f"{path}.gateways", mt.gateways)
    if mt.source_namespace is not None and not is_dns1123_label(mt.source_namespace):
        ctx.err(f"{path}.sourceNamespace", f'invalid namespace "{mt.source_namespace}"')


def _c_http_route(r: m.HTTPRoute, path: str, ctx: Ctx) -> None:
    if r.redirect is not None:
        if r.route:
            ctx.err(f"{path}.redirect", "HTTP route cannot contain both route and redirect")
        if r.fault is not None:
            ctx.err(f"{path}.redirect", "HTTP route cannot contain both fault and redirect")
        if r.rewrite is not None:
            ctx.err(f"{path}.redirect", "HTTP route cannot contain both rewrite and redirect")
        if r.direct_response is not None:
            ctx.err(f"{path}.redirect", "HTTP route cannot contain both directResponse and redirect")
    if r.direct_response is not None and r.route:
        ctx.err(f"{path}.directResponse", "HTTP route cannot contain both route and directResponse")
    if not r.route and r.redirect is None and r.direct_response is None and r.delegate is None \
            and not ctx.has_errors_under(f"{path}.route", f"{path}.redirect", f"{path}.directResponse"):
        ctx.err(path, "one of route, redirect or directResponse is required")
    _header_names(ctx, f"{path}.headers", r.headers)
    _weights(ctx, f"{path}.route", r.route)
    _min_duration(ctx, f"{path}.timeout", r.timeout)
    if r.mirror_percent is not None:
        _range(ctx, f"{path}.mirrorPercent", r.mirror_percent, 0, 100)
    if r.mirror is not None and r.mirrors:
        ctx.err(f"{path}.mirrors", "HTTP route cannot contain both mirror and mirrors")
    if r.delegate is not None and (r.route or r.redirect):
        ctx.err(f"{path}.delegate", "HTTP route with delegate cannot contain route or redirect")


def _c_redirect(r: m.HTTPRedirect, path: str, ctx: Ctx) -> None:
    if not r.uri and not r.authority and r.port is None and r.derive_port is None and not r.scheme:
        ctx.err(path, "redirect must specify uri, authority, scheme or port")
    if r.scheme and r.scheme not in ("http", "https"):
        ctx.err(f"{path}.scheme", f'invalid redirect scheme "{r.scheme}": must be "http" or "https"')
    if r.redirect_code is not None and not 300 <= r.redirect_code <= 399:
        ctx.err(f"{path}.redirectCode", f"must be a 3xx HTTP redirect code, got {r.redirect_code}")
    _port(ctx, f"{path}.port", r.port)


def _c_direct_response(r: m.HTTPDirectResponse, path: str, ctx: Ctx) -> None:
    if not 200 <= r.status <= 599:
        ctx.err(f"{path}.status", f"must be an HTTP status code between 200 and 599, got {r.status}")
    if r.body is not None:
        size = len(r.body.string or r.body.bytes or "")
        if size > 1 << 20:
            ctx.err(f"{path}.body", f"direct response body must be less than 1MB, got {size} bytes")
        elif size > 100 << 10:
            ctx.warn(f"{path}.body", f"large direct response body ({size} bytes)")


def _c_rewrite(r: m.HTTPRewrite, path: str, ctx: Ctx) -> None:
    if r.uri is None and r.authority is None and r.uri_regex_rewrite is None:
        ctx.err(path, "rewrite must specify uri, authority or uriRegexRewrite")
    if r.uri is not None and r.uri_regex_rewrite is not None:
        ctx.err(f"{path}.uriRegexRewrite", "rewrite cannot contain both uri and uriRegexRewrite")


def _c_regex_rewrite(r: m.RegexRewrite, path: str, ctx: Ctx) -> None:
    if not r.match or not r.rewrite:
        ctx.err(f"{path}.match" if not r.match else f"{path}.rewrite",
                "uriRegexRewrite needs both match and rewrite")
        return
    e = regex_error(r.match)
    if e:
        ctx.err(f"{path}.match", f"invalid RE2 regular expression {r.match!r}: {e}")


def _c_retry(r: m.HTTPRetry, path: str, ctx: Ctx) -> None:
    _range(ctx, f"{path}.attempts", r.attempts, 0)
    if r.attempts == 0 and (r.per_try_timeout is not None or r.retry_on or r.retry_remote_localities is not None):
        ctx.err(f"{path}.attempts", "retry policy configured but attempts is 0 (retries disabled): "
                                    "set attempts >= 1 or remove the other retry fields")
    _min_duration(ctx, f"{path}.perTryTimeout", r.per_try_timeout)
    _min_duration(ctx, f"{path}.backoff", r.backoff)
    for pol in r.retry_on:
        if pol in _RETRY_ON:
            continue
        if pol.isdigit():
            try:
                http.HTTPStatus(int(pol))
                continue
            except ValueError:
                pass
        ctx.err(f"{path}.retryOn", f'"{pol}" is not a valid retryOn policy (e.g. 5xx, gateway-error, '
                                   f"connect-failure, reset, retriable-4xx, or an HTTP status code)")


def _c_fault(f: m.HTTPFaultInjection, path: str, ctx: Ctx) -> None:
    if f.delay is None and f.abort is None and not ctx.has_errors_under(f"{path}.delay", f"{path}.abort"):
        ctx.err(path, "fault injection must have an abort and/or a delay")


def _c_delay(d: m.Delay, path: str, ctx: Ctx) -> None:
    if d.exponential_delay is not None:
        ctx.err(f"{path}.exponentialDelay", "exponentialDelay is not supported (Istio rejects it too); use fixedDelay")
    elif d.fixed_delay is None and not ctx.has_errors_under(f"{path}.fixedDelay"):
        ctx.err(f"{path}.fixedDelay", "required field is missing")
    _min_duration(ctx, f"{path}.fixedDelay", d.fixed_delay)
    if d.percent is not None:
        _range(ctx, f"{path}.percent", d.percent, 0, 100)


_GRPC_STATUS = {"OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
                "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED",
                "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED"}


def _c_abort(a: m.Abort, path: str, ctx: Ctx) -> None:
    if a.http_status is None and a.grpc_status is None and a.http2_error is None \
            and not ctx.has_errors_under(f"{path}.httpStatus", f"{path}.grpcStatus"):
        ctx.warn(path, "abort configured, but no httpStatus (or grpcStatus) is set: it aborts nothing")
    if a.grpc_status is not None and a.grpc_status not in _GRPC_STATUS:
        ctx.err(f"{path}.grpcStatus", f'gRPC status "{a.grpc_status}" is not supported (use a code name '
                                      f"such as UNAVAILABLE or NOT_FOUND)")
    if a.http_status is not None and not 200 <= a.http_status <= 599:
        ctx.err(f"{path}.httpStatus", f"must be an HTTP status code between 200 and 599, got {a.http_status}")
    if a.http2_error is not None:
        ctx.err(f"{path}.http2Error", "HTTP/2 abort fault injection is not supported (Istio rejects it too)")


def _c_cors(c: m.CorsPolicy, path: str, ctx: Ctx) -> None:
    for i, o in enumerate(c.allow_origins):
        if not o.value:
            ctx.err(f"{path}.allowOrigins[{i}]", "allowOrigins entries must not be empty")
    for i, meth in enumerate(c.allow_methods):
        if meth not in _HTTP_METHODS:
            ctx.err(f"{path}.allowMethods[{i}]", f'"{meth}" is not a supported HTTP method')
    for jn, names in (("allowHeaders", c.allow_headers), ("exposeHeaders", c.expose_headers)):
        for i, name in enumerate(names):
            if name != "*" and not _HEADER_NAME.match(name):
                ctx.err(f"{path}.{jn}[{i}]", f'invalid HTTP header name "{name}"')
    if c.max_age is not None:
        _min_duration(ctx, f"{path}.maxAge", c.max_age)
        if c.max_age != int(c.max_age):
            ctx.err(f"{path}.maxAge", "maxAge is accurate only to whole seconds")


def _c_l4_match(mt, path: str, ctx: Ctx) -> None:
    for i, s in enumerate(mt.destination_subnets):
        e = ip_or_cidr_error(s)
        if e:
            ctx.err(f"{path}.destinationSubnets[{i}]", e)
    _port(ctx, f"{path}.port", mt.port)
    validate_labels(mt.source_labels, f"{path}.sourceLabels", ctx)
    _gateways(ctx, f"{path}.gateways", mt.gateways)


def _c_tls_match(mt: m.TLSMatchAttributes, path: str, ctx: Ctx) -> None:
    if not mt.sni_hosts and not ctx.has_errors_under(f"{path}.sniHosts"):
        ctx.err(f"{path}.sniHosts", "TLS match must have at least one SNI host")
    for i, h in enumerate(mt.sni_hosts):
        if wildcard_domain_error(h) and not is_ip(h):
            ctx.err(f"{path}.sniHosts[{i}]", wildcard_domain_error(h))
    _c_l4_match(mt, path, ctx)


def _c_tcp_route(r: m.TCPRoute, path: str, ctx: Ctx) -> None:
    if not r.route and not ctx.has_errors_under(f"{path}.route"):
        ctx.err(f"{path}.route", "TCP route is required")
    _weights(ctx, f"{path}.route", r.route)


def _c_tls_route(r: m.TLSRoute, path: str, ctx: Ctx) -> None:
    if not r.match and not ctx.has_errors_under(f"{path}.match"):
        ctx.err(f"{path}.match", "TLS route must have at least one match condition")
    if not r.route and not ctx.has_errors_under(f"{path}.route"):
        ctx.err(f"{path}.route", "TLS route is required")
    _weights(ctx, f"{path}.route", r.route)


def _c_virtual_service(vs: m.VirtualService, path: str, ctx: Ctx) -> None:
    if not vs.hosts and not ctx.has_errors_under(f"{path}.hosts"):
        ctx.err(f"{path}.hosts", "at least one host is required")
    applies_to_mesh = not vs.gateways or "mesh" in vs.gateways
    _gateways(ctx, f"{path}.gateways", vs.gateways)
    valid = True
    for i, h in enumerate(vs.hosts):
        e = wildcard_domain_error(h)
        if e and not is_ip(h):
            ctx.err(f"{path}.hosts[{i}]", e)
            valid = False
        elif applies_to_mesh and h == "*":
            ctx.err(f"{path}.hosts[{i}]", 'wildcard host "*" is not allowed for virtual services bound to the mesh '
                                          "(set gateways, or name the hosts)")
            valid = False
    if valid:
        qualified = [h.lower() for h in vs.hosts]
        for i in range(len(qualified)):
            for j in range(i + 1, len(qualified)):
                a, b = qualified[i], qualified[j]
                if a == b or (a.startswith("*") and b.endswith(a[1:])) or (b.startswith("*") and a.endswith(b[1:])):
                    ctx.err(f"{path}.hosts[{j}]", f"duplicate hosts in virtual service: {vs.hosts[i]} & {vs.hosts[j]}")
    if not vs.http and not vs.tcp and not vs.tls \
            and not ctx.has_errors_under(f"{path}.http", f"{path}.tcp", f"{path}.tls"):
        ctx.err(path, "one of http, tcp or tls routes is required")
    for i, r in enumerate(vs.tls):
        for j, mt in enumerate(r.match):
            for k, sni in enumerate(mt.sni_hosts):
                s = sni.lower()
                if not any(h == "*" or h.lower() == s or (h.startswith("*") and s.endswith(h[1:].lower()))
                           or (s.startswith("*") and h.startswith("*") and s.endswith(h[1:].lower()))
                           for h in vs.hosts):
                    ctx.err(f"{path}.tls[{i}].match[{j}].sniHosts[{k}]",
                            f'SNI host "{sni}" is not a compatible subset of any of the virtual service hosts: '
                            f"[{', '.join(vs.hosts)}]")
    _export_to(ctx, f"{path}.exportTo", vs.export_to)
    _unreachable_rules(ctx, f"{path}.http", vs.http, "HTTP")
    _unreachable_rules(ctx, f"{path}.tcp", vs.tcp, "TCP")
    _unreachable_rules(ctx, f"{path}.tls", vs.tls, "TLS")


def _unreachable_rules(ctx: Ctx, path: str, routes, kind: str) -> None:
    """Istio's analyzeUnreachable*Rules, as warnings: rules after a rule without matches
    never apply, and a match identical to an earlier one is ineffective.

    Skipped when any rule of the list has an error: an invalid rule is dropped from (or
    decoded partially into) ``routes``, so its indices and matches would not be the file's,
    and the warnings would be about rules that do not exist as written."""
    if ctx.has_errors_under(path):
        return
    def rule_name(r, i):
        name = getattr(r, "name", None)
        return f'"{name}"' if name else f"#{i}"

    catch_all = None
    seen: list = []     # (match without its name, rule name); matches hold read-only maps: not hashable
    for i, r in enumerate(routes):
        rpath = f"{path}[{i}]"
        if not r.match:
            if catch_all is not None:
                ctx.warn(rpath, f"{kind} rule {rule_name(r, i)} is unreachable: only the last rule can have "
                                f"no matches (rule {catch_all} matches everything)")
            else:
                catch_all = rule_name(r, i)
            continue
        if catch_all is not None:
            ctx.warn(rpath, f"{kind} rule {rule_name(r, i)} is unreachable: rule {catch_all} without matches "
                            f"comes before it")
            continue
        dups = 0
        for j, mt in enumerate(r.match):
            key = dataclasses.replace(mt, name=None) if isinstance(mt, m.HTTPMatchRequest) else mt
            prior = next((name for k, name in seen if k == key), None)
            if prior is not None:
                dups += 1
                ctx.warn(f"{rpath}.match[{j}]", f"match is ineffective: the same match is in rule {prior}")
            else:
                seen.append((key, rule_name(r, i)))
        if dups == len(r.match):
            ctx.warn(rpath, f"{kind} rule {rule_name(r, i)} is unreachable: all its matches are used by prior rules")


def _c_destination_rule(dr: m.DestinationRule, path: str, ctx: Ctx) -> None:
    e = wildcard_domain_error(dr.host)
    if e:
        ctx.err(f"{path}.host", e)
    names: dict[str, int] = {}
    for i, s in enumerate(dr.subsets):
        if s.name in names:
            ctx.err(f"{path}.subsets[{i}].name", f'duplicate subset name "{s.name}" (also subsets[{names[s.name]}])')
        names.setdefault(s.name, i)
    _export_to(ctx, f"{path}.exportTo", dr.export_to)
    if dr.workload_selector is not None:
        validate_labels(dr.workload_selector.match_labels, f"{path}.workloadSelector.matchLabels", ctx, selector=True)
    if dr.host.startswith("*"):
        for tls_path, t in _tls_settings(dr, path):
            if (t.mode in ("SIMPLE", "MUTUAL") and not t.sni and not t.subject_alt_names
                    and not t.insecure_skip_verify):
                ctx.warn(tls_path, f"host {dr.host!r} is a wildcard: TLS origination has no server name to send "
                         "or verify, so connections fail (503 UF); set sni or subjectAltNames")


def _tls_settings(dr: m.DestinationRule, path: str):
    """(path, ClientTLSSettings) of every tls block of ``dr``: host level, its ports, the subsets'."""
    levels = [(f"{path}.trafficPolicy", dr.traffic_policy)]
    levels += [(f"{path}.subsets[{i}].trafficPolicy", s.traffic_policy) for i, s in enumerate(dr.subsets)]
    for where, tp in levels:
        if tp is None:
            continue
        if tp.tls is not None:
            yield f"{where}.tls", tp.tls
        for j, port in enumerate(tp.port_level_settings):
            if port.tls is not None:
                yield f"{where}.portLevelSettings[{j}].tls", port.tls


def _c_subset(s: m.Subset, path: str, ctx: Ctx) -> None:
    if not is_dns1123_label(s.name):
        ctx.err(f"{path}.name", f'invalid subset name "{s.name}": must be a DNS-1123 label '
                                f"(lower-case letters, digits, '-')")
    validate_labels(s.labels, f"{path}.labels", ctx)


def _c_traffic_policy(t: m.TrafficPolicy, path: str, ctx: Ctx) -> None:
    if (t.load_balancer is None and t.connection_pool is None and t.outlier_detection is None
            and t.tls is None and not t.port_level_settings and t.tunnel is None and t.proxy_protocol is None
            and not ctx.has_errors_under(path)):
        ctx.err(path, "traffic policy must have at least one field")
    seen: dict[int, int] = {}
    for i, p in enumerate(t.port_level_settings):
        if p.port is None:
            ctx.err(f"{path}.portLevelSettings[{i}].port", "required field is missing")
        elif p.port in seen:
            ctx.err(f"{path}.portLevelSettings[{i}].port", f"duplicate port {p.port} (also portLevelSettings[{seen[p.port]}])")
        else:
            seen[p.port] = i


def _c_port_traffic_policy(p: m.PortTrafficPolicy, path: str, ctx: Ctx) -> None:
    if p.load_balancer is None and p.connection_pool is None and p.outlier_detection is None and p.tls is None \
            and not ctx.has_errors_under(path):
        ctx.err(path, "port level setting must have at least one of loadBalancer, connectionPool, "
                      "outlierDetection or tls")


def _c_lb(lb: m.LoadBalancerSettings, path: str, ctx: Ctx) -> None:
    pass  # oneof simple/consistentHash is structural; durations are non-negative by parsing


def _c_consistent_hash(c: m.ConsistentHashLB, path: str, ctx: Ctx) -> None:
    if c.http_header_name is None and c.http_cookie is None and c.use_source_ip is None \
            and c.http_query_parameter_name is None and not ctx.has_errors_under(path):
        ctx.err(path, "consistentHash needs one of httpHeaderName, httpCookie, useSourceIp or httpQueryParameterName")
    if c.minimum_ring_size is not None and (c.ring_hash is not None or c.maglev is not None):
        ctx.err(f"{path}.minimumRingSize", "cannot be set together with ringHash or maglev (use ringHash.minimumRingSize)")
    if c.http_header_name is not None and not _HEADER_NAME.match(c.http_header_name):
        ctx.err(f"{path}.httpHeaderName", f'invalid HTTP header name "{c.http_header_name}"')


def _c_locality(lb: m.LocalityLoadBalancerSetting, path: str, ctx: Ctx) -> None:
    if lb.distribute and lb.failover:
        ctx.err(path, "cannot set both distribute and failover")
    for i, d in enumerate(lb.distribute):
        total = 0
        for loc, w in d.to.items():
            if not 1 <= w <= 100:
                ctx.err(f"{path}.distribute[{i}].to[{loc}]", f"locality weight must be between 1 and 100, got {w}")
            total += w
        if d.to and total != 100:
            ctx.err(f"{path}.distribute[{i}].to", f"total locality weight {total} != 100")
    for i, f in enumerate(lb.failover):
        if f.from_ is not None and f.from_ == f.to:
            ctx.err(f"{path}.failover[{i}]", "locality failover must name different regions in from and to")
        if f.to and "*" in f.to:
            ctx.err(f"{path}.failover[{i}].to", "must not contain the '*' wildcard")


def _c_conn_pool(c: m.ConnectionPoolSettings, path: str, ctx: Ctx) -> None:
    if c.tcp is None and c.http is None and not ctx.has_errors_under(f"{path}.tcp", f"{path}.http"):
        ctx.err(path, "connection pool must have at least one of tcp or http")


def _c_tcp_settings(t: m.TCPSettings, path: str, ctx: Ctx) -> None:
    _range(ctx, f"{path}.maxConnections", t.max_connections, 0)
    _min_duration(ctx, f"{path}.connectTimeout", t.connect_timeout)
    _min_duration(ctx, f"{path}.maxConnectionDuration", t.max_connection_duration)


def _c_http_settings(h: m.HTTPSettings, path: str, ctx: Ctx) -> None:
    for attr, jn in (("http1_max_pending_requests", "http1MaxPendingRequests"),
                     ("http2_max_requests", "http2MaxRequests"),
                     ("max_requests_per_connection", "maxRequestsPerConnection"),
                     ("max_retries", "maxRetries"), ("max_concurrent_streams", "maxConcurrentStreams")):
        _range(ctx, f"{path}.{jn}", getattr(h, attr), 0)
    _min_duration(ctx, f"{path}.idleTimeout", h.idle_timeout)


def _c_outlier(o: m.OutlierDetection, path: str, ctx: Ctx) -> None:
    _range(ctx, f"{path}.consecutiveErrors", o.consecutive_errors, 0)
    _min_duration(ctx, f"{path}.interval", o.interval)
    _min_duration(ctx, f"{path}.baseEjectionTime", o.base_ejection_time)
    _range(ctx, f"{path}.maxEjectionPercent", o.max_ejection_percent, 0, 100)
    _range(ctx, f"{path}.minHealthPercent", o.min_health_percent, 0, 100)


def _c_client_tls(t: m.ClientTLSSettings, path: str, ctx: Ctx) -> None:
    if t.mode == "MUTUAL" and not t.credential_name:
        if not t.client_certificate:
            ctx.err(f"{path}.clientCertificate", "required for mode MUTUAL (or set credentialName)")
        if not t.private_key:
            ctx.err(f"{path}.privateKey", "required for mode MUTUAL (or set credentialName)")
    if t.mode in ("MUTUAL", "SIMPLE") and t.credential_name and (t.client_certificate or t.private_key or t.ca_certificates):
        ctx.err(f"{path}.credentialName", "cannot be combined with clientCertificate, privateKey or caCertificates")
    if t.mode in ("MUTUAL", "SIMPLE") and t.credential_name:
        ctx.warn(f"{path}.credentialName", f"Kubernetes Secret {t.credential_name!r} cannot be read by nodeagent: "
                 "connections to this destination fail (503 UF), as Istio's do when the secret is missing; "
                 "use caCertificates, clientCertificate and privateKey files instead")
    if t.ca_crl and t.mode in ("MUTUAL", "SIMPLE") and t.insecure_skip_verify:
        ctx.warn(f"{path}.caCrl", "ignored: insecureSkipVerify is true, the server certificate is not verified")
    if t.mode in ("ISTIO_MUTUAL", "DISABLE", None):
        for attr, jn in (("sni", "sni"), ("subject_alt_names", "subjectAltNames")):
            if getattr(t, attr):
                ctx.warn(f"{path}.{jn}", f"ignored with mode {t.mode or 'DISABLE'}"
                         + (" (the mesh tunnel checks the identity the workload directory gives)"
                            if t.mode == "ISTIO_MUTUAL" else ""))
    if t.mode == "ISTIO_MUTUAL":
        for attr, jn in (("client_certificate", "clientCertificate"), ("private_key", "privateKey"),
                         ("ca_certificates", "caCertificates"), ("credential_name", "credentialName"),
                         ("ca_crl", "caCrl")):
            if getattr(t, attr):
                ctx.err(f"{path}.{jn}", "cannot be set when mode is ISTIO_MUTUAL (the mesh provides certificates)")


def _c_service_entry(se: m.ServiceEntry, path: str, ctx: Ctx) -> None:
    if not se.hosts and not ctx.has_errors_under(f"{path}.hosts"):
        ctx.err(f"{path}.hosts", "at least one host is required")
    for i, h in enumerate(se.hosts):
        if h == "*":
            ctx.err(f"{path}.hosts[{i}]", 'invalid host "*"')
        else:
            e = wildcard_domain_error(h)
            if e:
                ctx.err(f"{path}.hosts[{i}]", e)
    cidr = False
    for i, a in enumerate(se.addresses):
        cidr = cidr or "/" in a
        e = ip_or_cidr_error(a)
        if e:
            ctx.err(f"{path}.addresses[{i}]", e)
    resolution = se.resolution or "NONE"
    if cidr and resolution not in ("NONE", "STATIC"):
        ctx.err(f"{path}.addresses", "CIDR addresses are allowed only with resolution NONE or STATIC")
    if not se.ports and not ctx.has_errors_under(f"{path}.ports"):
        ctx.err(f"{path}.ports", "at least one port is required")
    names: dict[str, int] = {}
    numbers: dict[int, int] = {}
    for i, p in enumerate(se.ports):
        if p.name in names:
            ctx.err(f"{path}.ports[{i}].name", f'port name "{p.name}" already defined (ports[{names[p.name]}])')
        names.setdefault(p.name, i)
        if p.number in numbers:
            ctx.err(f"{path}.ports[{i}].number", f"port {p.number} already defined (ports[{numbers[p.number]}])")
        numbers.setdefault(p.number, i)
    if se.workload_selector is not None and se.endpoints:
        ctx.err(f"{path}.workloadSelector", "only one of workloadSelector or endpoints may be set")
    if se.workload_selector is not None:
        validate_labels(se.workload_selector.match_labels, f"{path}.workloadSelector.labels", ctx, selector=True)
    if resolution == "NONE" and se.endpoints:
        ctx.err(f"{path}.endpoints", "no endpoints may be given with resolution NONE (set resolution: STATIC or DNS)")
    if resolution == "NONE" and se.workload_selector is not None:
        ctx.warn(f"{path}.workloadSelector", "workloadSelector should not be set when resolution is NONE")
    if resolution == "DNS_ROUND_ROBIN" and len(se.endpoints) > 1:
        ctx.err(f"{path}.endpoints", "there must be 0 or 1 endpoint with resolution DNS_ROUND_ROBIN")
    for i, h in enumerate(se.hosts):
        first = h.split(".", 1)[0]
        if first.startswith("*") and first != "*":
            ctx.warn(f"{path}.hosts[{i}]", f'partial wildcard "{first}" is not supported by all proxies; '
                                           f'prefer "*." followed by a domain')
    unix = False
    for i, ep in enumerate(se.endpoints):
        ep_path = f"{path}.endpoints[{i}]"
        addr = ep.address or ""
        if resolution == "STATIC":
            if addr.startswith("unix://"):
                unix = True
                if not addr[len("unix://"):].startswith("/") and not addr[len("unix://"):].startswith("@"):
                    ctx.err(f"{ep_path}.address", f'invalid unix address "{addr}": must be an absolute path')
                if ep.ports:
                    ctx.err(f"{ep_path}.ports", f"unix endpoint {addr} must not include ports")
            elif not is_ip(addr):
                ctx.err(f"{ep_path}.address", f'must be an IP address with resolution STATIC, got "{addr}"')
        elif resolution in ("DNS", "DNS_ROUND_ROBIN"):
            if not is_ip(addr) and (wildcard_domain_error(addr) or addr.startswith("*")):
                ctx.err(f"{ep_path}.address", f'endpoint address "{addr}" is not a valid FQDN or IP address')
        for name in ep.ports:
            if name not in names:
                ctx.err(f"{ep_path}.ports[{name}]", f'port name "{name}" is not defined by the service entry ports')
    if unix and len(se.ports) != 1:
        ctx.err(f"{path}.ports", "exactly 1 service port is required for unix endpoints")
    if resolution in ("DNS", "DNS_ROUND_ROBIN") and not se.endpoints:
        for i, h in enumerate(se.hosts):
            if h.startswith("*") or "." not in h:
                ctx.err(f"{path}.hosts[{i}]", "hosts must be fully qualified when resolution is DNS "
                                              "and no endpoints are given")
    if resolution != "NONE" and len(se.hosts) > 1:
        for i, p in enumerate(se.ports):
            proto = (p.protocol or "").upper()
            if not (proto.startswith("HTTP") or proto.startswith("GRPC") or proto in ("TLS", "HTTPS")):
                ctx.err(f"{path}.ports[{i}].protocol", "multiple hosts with a non-HTTP, non-TLS port need resolution NONE")
                break
    _export_to(ctx, f"{path}.exportTo", se.export_to)


def _c_service_port(p: m.ServicePort, path: str, ctx: Ctx) -> None:
    _port(ctx, f"{path}.number", p.number)
    if not p.name:
        if not ctx.has_errors_under(f"{path}.name"):
            ctx.err(f"{path}.name", "required field is missing")
    elif not is_dns1123_label(p.name):
        ctx.err(f"{path}.name", f'invalid port name "{p.name}": must be a DNS-1123 label')
    if p.protocol is not None and p.protocol.upper() not in PROTOCOLS:
        ctx.err(f"{path}.protocol", f'unsupported protocol "{p.protocol}" (one of {", ".join(sorted(PROTOCOLS))})')
    if p.target_port is not None:
        _port(ctx, f"{path}.targetPort", p.target_port)


def _c_workload_entry(we: m.WorkloadEntry, path: str, ctx: Ctx) -> None:
    addr = we.address or ""
    if not addr and not ctx.has_errors_under(f"{path}.address"):
        if we.network:
            ctx.warn(f"{path}.address", f'address is unset with network "{we.network}"')
        else:
            ctx.err(f"{path}.address", "required field is missing")
    elif addr.startswith("unix://"):
        if not addr[len("unix://"):].startswith(("/", "@")):
            ctx.err(f"{path}.address", f'invalid unix address "{addr}": must be an absolute path')
        if we.ports:
            ctx.err(f"{path}.ports", f"unix endpoint {addr} must not include ports")
    elif addr and not is_ip(addr) and (wildcard_domain_error(addr) or addr.startswith("*")):
        ctx.err(f"{path}.address", f'"{addr}" is not a valid IP address or FQDN')
    for name, port in we.ports.items():
        if not is_dns1123_label(name):
            ctx.err(f"{path}.ports[{name}]", f'invalid port name "{name}": must be a DNS-1123 label')
        _port(ctx, f"{path}.ports[{name}]", port)
    validate_labels(we.labels, f"{path}.labels", ctx)
    if we.service_account is not None and not is_dns1123_subdomain(we.service_account):
        ctx.err(f"{path}.serviceAccount", f'invalid service account name "{we.service_account}"')


def _c_workload_selector(s: m.WorkloadSelector, path: str, ctx: Ctx) -> None:
    validate_labels(s.match_labels, f"{path}.matchLabels", ctx, selector=True)


def _c_authz(ap: m.AuthorizationPolicy, path: str, ctx: Ctx) -> None:
    if ap.selector is not None and (ap.target_ref is not None or ap.target_refs):
        ctx.err(f"{path}.targetRef" if ap.target_ref else f"{path}.targetRefs",
                "only one of selector or targetRef(s) may be set")
    if ap.target_ref is not None and ap.target_refs:
        ctx.err(f"{path}.targetRefs", "only one of targetRef or targetRefs may be set")
    if ap.action == "CUSTOM" and ap.provider is None and not ctx.has_errors_under(f"{path}.provider"):
        ctx.err(f"{path}.provider", "required when action is CUSTOM")
    if ap.action != "CUSTOM" and ap.provider is not None:
        ctx.err(f"{path}.provider", f"may only be set when action is CUSTOM, got action {ap.action}")
    # what loads but is enforced fail-closed (JWT principals, CUSTOM providers, ...)
    try:
        from policy import authz   # lazy: policy.authz is a consumer of the model, not of this module
        notes = authz.unsupported_field_warnings(ap, path)
    except Exception:              # advisory only: never refuse a valid policy because of it
        notes = []
    for p, msg in notes:
        ctx.warn(p, msg)


def _nonempty_strings(obj, path: str, ctx: Ctx, jnames: dict[str, str]) -> bool:
    any_set = False
    for attr, jn in jnames.items():
        vals = getattr(obj, attr)
        if vals:
            any_set = True
        for i, v in enumerate(vals):
            if v == "":
                ctx.err(f"{path}.{jn}[{i}]", "empty value is not allowed")
    return any_set


_SOURCE_FIELDS = {"principals": "principals", "not_principals": "notPrincipals",
                  "request_principals": "requestPrincipals", "not_request_principals": "notRequestPrincipals",
                  "namespaces": "namespaces", "not_namespaces": "notNamespaces", "ip_blocks": "ipBlocks",
                  "not_ip_blocks": "notIpBlocks", "remote_ip_blocks": "remoteIpBlocks",
                  "not_remote_ip_blocks": "notRemoteIpBlocks", "service_accounts": "serviceAccounts",
                  "not_service_accounts": "notServiceAccounts"}
_OPERATION_FIELDS = {"hosts": "hosts", "not_hosts": "notHosts", "ports": "ports", "not_ports": "notPorts",
                     "methods": "methods", "not_methods": "notMethods", "paths": "paths", "not_paths": "notPaths"}


def _c_rule_from(f: m.RuleFrom, path: str, ctx: Ctx) -> None:
    if f.source is None and not ctx.has_errors_under(f"{path}.source"):
        ctx.err(f"{path}.source", "required field is missing")


def _c_rule_to(t: m.RuleTo, path: str, ctx: Ctx) -> None:
    if t.operation is None and not ctx.has_errors_under(f"{path}.operation"):
        ctx.err(f"{path}.operation", "required field is missing")


def _c_source(s: m.Source, path: str, ctx: Ctx) -> None:
    if not _nonempty_strings(s, path, ctx, _SOURCE_FIELDS) and not ctx.has_errors_under(path):
        ctx.err(path, "source must not be empty")
    for attr in ("ip_blocks", "not_ip_blocks", "remote_ip_blocks", "not_remote_ip_blocks"):
        for i, v in enumerate(getattr(s, attr)):
            if v:
                e = ip_or_cidr_error(v)
                if e:
                    ctx.err(f"{path}.{_SOURCE_FIELDS[attr]}[{i}]", e)
    if (s.service_accounts or s.not_service_accounts) and (s.principals or s.not_principals):
        ctx.err(f"{path}.serviceAccounts", "cannot be combined with principals or notPrincipals")


def _c_operation(o: m.Operation, path: str, ctx: Ctx) -> None:
    if not _nonempty_strings(o, path, ctx, _OPERATION_FIELDS) and not ctx.has_errors_under(path):
        ctx.err(path, "operation must not be empty")
    for attr in ("ports", "not_ports"):
        for i, v in enumerate(getattr(o, attr)):
            if v and (not v.isdigit() or not 1 <= int(v) <= 65535):
                ctx.err(f"{path}.{_OPERATION_FIELDS[attr]}[{i}]", f'must be a port number between 1 and 65535, got "{v}"')


def _c_condition(c: m.Condition, path: str, ctx: Ctx) -> None:
    if not _AUTHZ_KEYS.match(c.key):
        ctx.err(f"{path}.key", f'unknown attribute "{c.key}" (e.g. request.headers[name], source.ip, '
                               f"remote.ip, source.namespace, source.principal, destination.ip, "
                               f"destination.port, connection.sni, request.auth.*)")
        return
    if not c.values and not c.not_values and not ctx.has_errors_under(f"{path}.values", f"{path}.notValues"):
        ctx.err(path, f"at least one of values or notValues must be set for key {c.key}")
    _nonempty_strings(c, path, ctx, {"values": "values", "not_values": "notValues"})
    for attr, jn in (("values", "values"), ("not_values", "notValues")):
        for i, v in enumerate(getattr(c, attr)):
            if c.key in ("source.ip", "remote.ip", "destination.ip") and v:
                e = ip_or_cidr_error(v)
                if e:
                    ctx.err(f"{path}.{jn}[{i}]", e)
            if c.key == "destination.port" and v and (not v.isdigit() or not 1 <= int(v) <= 65535):
                ctx.err(f"{path}.{jn}[{i}]", f'must be a port number between 1 and 65535, got "{v}"')


def _c_peer_authn(pa: m.PeerAuthentication, path: str, ctx: Ctx) -> None:
    empty_selector = pa.selector is None or not pa.selector.match_labels
    if empty_selector and pa.port_level_mtls:
        ctx.err(f"{path}.portLevelMtls", "namespace-wide (no selector) peer authentication cannot have "
                                         "port level mTLS; add a selector")
    for port in pa.port_level_mtls:
        if not 1 <= port <= 65535:
            ctx.err(f"{path}.portLevelMtls[{port}]", f"must be a port number between 1 and 65535, got {port}")


def _c_target_ref(t: m.PolicyTargetReference, path: str, ctx: Ctx) -> None:
    if t.namespace is not None and t.namespace != ctx.namespace:
        ctx.err(f"{path}.namespace", f"cross-namespace targetRef is not allowed (policy namespace is {ctx.namespace})")


def _c_vs_full(vs, path, ctx):
    _c_virtual_service(vs, path, ctx)


CHECKS: dict[str, Callable[[Any, str, Ctx], None]] = {
    "Destination": _c_destination,
    "HTTPRouteDestination": _c_route_destination,
    "HTTPMatchRequest": _c_match,
    "HTTPRoute": _c_http_route,
    "HTTPRedirect": _c_redirect,
    "HTTPDirectResponse": _c_direct_response,
    "HTTPRewrite": _c_rewrite,
    "RegexRewrite": _c_regex_rewrite,
    "HTTPRetry": _c_retry,
    "HTTPFaultInjection": _c_fault,
    "Delay": _c_delay,
    "Abort": _c_abort,
    "CorsPolicy": _c_cors,
    "L4MatchAttributes": _c_l4_match,
    "TLSMatchAttributes": _c_tls_match,
    "TCPRoute": _c_tcp_route,
    "TLSRoute": _c_tls_route,
    "VirtualService": _c_vs_full,
    "DestinationRule": _c_destination_rule,
    "Subset": _c_subset,
    "TrafficPolicy": _c_traffic_policy,
    "PortTrafficPolicy": _c_port_traffic_policy,
    "LoadBalancerSettings": _c_lb,
    "ConsistentHashLB": _c_consistent_hash,
    "LocalityLoadBalancerSetting": _c_locality,
    "ConnectionPoolSettings": _c_conn_pool,
    "TCPSettings": _c_tcp_settings,
    "HTTPSettings": _c_http_settings,
    "OutlierDetection": _c_outlier,
    "ClientTLSSettings": _c_client_tls,
    "ServiceEntry": _c_service_entry,
    "ServicePort": _c_service_port,
    "WorkloadEntry": _c_workload_entry,
    "WorkloadSelector": _c_workload_selector,
    "AuthorizationPolicy": _c_authz,
    "RuleFrom": _c_rule_from,
    "RuleTo": _c_rule_to,
    "Source": _c_source,
    "Operation": _c_operation,
    "Condition": _c_condition,
    "PeerAuthentication": _c_peer_authn,
    "PolicyTargetReference": _c_target_ref,
}
