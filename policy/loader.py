"""Strict loading of Istio YAML, like the Kubernetes API server with Istio's CRDs.

- multi-document YAML (and JSON); ``kind: List`` with ``items`` is expanded;
- VirtualService, DestinationRule, ServiceEntry, WorkloadEntry
  (networking.istio.io v1/v1beta1/v1alpha3), AuthorizationPolicy and
  PeerAuthentication (security.istio.io v1/v1beta1) are decoded and validated;
- other Istio kinds (Gateway, Sidecar, EnvoyFilter, ...) and non-Istio objects
  (a Service, a Deployment) are accepted and ignored, with ONE warning per file
  naming them;
- a kind that does not exist in its Istio API group, or a version the group
  does not serve, is an error; so is every structural or semantic problem
  (see ``policy.validate``); every error of a file is reported;
- an empty file is a warning ("no objects"); callers decide whether "no
  objects at all" is an error (the CLI does, as kubectl does);
- a file with any error contributes no resources.

The only I/O here is reading the files named by the caller.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from policy import model as m
from policy.errors import ConfigError, Diagnostic
from policy.schema import ISTIO_GROUPS, STRMAP, kinds_in_group
from policy.validate import (
    INVALID, Ctx, decode, decode_spec, is_dns1123_label, is_dns1123_subdomain, node_type_name,
    validate_labels,
)

__all__ = ["LoadResult", "IgnoredObject", "load_text", "load_file", "load_paths",
           "config_files", "CONFIG_SUFFIXES", "object_display"]

CONFIG_SUFFIXES = (".yaml", ".yml", ".json")

_OBJECT_META = {
    "name", "namespace", "labels", "annotations", "uid", "resourceVersion", "generation",
    "creationTimestamp", "deletionTimestamp", "deletionGracePeriodSeconds", "ownerReferences",
    "finalizers", "managedFields", "generateName", "selfLink",
}
_TOP_LEVEL = ("apiVersion", "kind", "metadata", "spec", "status")


@dataclass(frozen=True, slots=True)
class IgnoredObject:
    """An object that loaded but that nodeagent does not enforce."""
    api_version: str
    kind: str
    namespace: str
    name: str
    source: m.SourceRef
    istio: bool

    @property
    def ref(self) -> str:
        return f"{self.kind} {self.namespace}/{self.name}" if self.name else self.kind


@dataclass
class LoadResult:
    resources: list[m.Resource] = field(default_factory=list)
    errors: list[Diagnostic] = field(default_factory=list)
    warnings: list[Diagnostic] = field(default_factory=list)
    ignored: list[IgnoredObject] = field(default_factory=list)
    files: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors

    def extend(self, other: "LoadResult") -> None:
        self.resources.extend(other.resources)
        self.errors.extend(other.errors)
        self.warnings.extend(other.warnings)
        self.ignored.extend(other.ignored)
        self.files.extend(other.files)

    def raise_for_errors(self) -> None:
        if self.errors:
            raise ConfigError(self.errors, self.warnings)


def object_display(kind: str, api_version: str, name: str) -> str:
    """kubectl-style ``virtualservice.networking.istio.io/reviews``."""
    group = api_version.split("/")[0] if "/" in api_version else ""
    return f"{kind.lower()}.{group}/{name}" if group else f"{kind.lower()}/{name}"


# libyaml's parser when available (several times faster); same nodes, tags and marks
YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _line(node: Node) -> int:
    return node.start_mark.line + 1


def _construct(node: Node):
    c = yaml.constructor.SafeConstructor()
    return c.construct_document(node)


def _scalar_str(node: Node | None) -> str | None:
    if isinstance(node, ScalarNode) and node_type_name(node) == "string":
        return node.value
    return None


def load_text(text: str, file: str, default_namespace: str = "default",
              known_keys: dict | None = None) -> LoadResult:
    """Load every object of one YAML text. ``known_keys`` (key -> SourceRef) is shared
    across files to detect duplicate objects."""
    res = LoadResult(files=[file])
    keys = known_keys if known_keys is not None else {}
    docs: list[Node] = []
    try:
        for doc in yaml.compose_all(text, Loader=YAML_LOADER):
            docs.append(doc)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else None
        problem = exc.problem or "invalid YAML"
        ctx_txt = f" ({exc.context})" if exc.context else ""
        res.errors.append(Diagnostic(file, line, f"invalid YAML: {problem}{ctx_txt}"))
        return res
    except yaml.YAMLError as exc:
        res.errors.append(Diagnostic(file, None, f"invalid YAML: {exc}"))
        return res
    except RecursionError:
        res.errors.append(Diagnostic(file, None, "invalid YAML: nesting too deep"))
        return res

    count = 0
    for index, doc in enumerate(docs):
        if doc is None:
            continue
        if isinstance(doc, ScalarNode) and node_type_name(doc) == "null":
            continue
        count += 1
        try:
            _load_object(doc, file, index + 1, default_namespace, keys, res)
        except Exception as exc:  # a validator bug must not become a traceback for the user
            res.errors.append(Diagnostic(
                file, _line(doc), f"document {index + 1}: internal error while validating "
                                  f"({exc.__class__.__name__}: {exc}); please report this"))
    if count == 0:
        res.warnings.append(Diagnostic(file, None, "no objects in this file (it is empty)", severity="warning"))
    if res.ignored:
        names = ", ".join(f"{o.ref} ({o.api_version}, line {o.source.line})" for o in res.ignored)
        res.warnings.append(Diagnostic(
            file, res.ignored[0].source.line,
            f"loaded but not enforced by nodeagent (ignored): {names}", severity="warning"))
    if res.errors:
        res.resources = []
        res.errors.sort(key=lambda d: d.line or 0)
    return res


def _load_object(doc: Node, file: str, index: int, default_namespace: str, keys: dict,
                 res: LoadResult) -> None:
    line = _line(doc)
    if not isinstance(doc, MappingNode):
        res.errors.append(Diagnostic(
            file, line, f"document {index} must be a Kubernetes object (a mapping with apiVersion, kind "
                        f"and metadata), got {node_type_name(doc)}"))
        return
    fields: dict[str, tuple[Node, Node]] = {}
    dup_errors = []
    for knode, vnode in doc.value:
        k = _scalar_str(knode)
        if k is None:
            dup_errors.append(Diagnostic(file, _line(knode), f"document {index}: field names must be strings"))
            continue
        if k in fields:
            dup_errors.append(Diagnostic(file, _line(knode), f'document {index}: duplicate field "{k}"'))
            continue
        fields[k] = (knode, vnode)

    api_version = _scalar_str(fields.get("apiVersion", (None, None))[1])
    kind = _scalar_str(fields.get("kind", (None, None))[1])
    meta_node = fields.get("metadata", (None, None))[1]
    name_node = None
    ns_node = None
    if isinstance(meta_node, MappingNode):
        for knode, vnode in meta_node.value:
            if _scalar_str(knode) == "name":
                name_node = vnode
            elif _scalar_str(knode) == "namespace":
                ns_node = vnode
    name = _scalar_str(name_node) or ""
    namespace = _scalar_str(ns_node) or default_namespace
    obj_ref = f"{kind} {namespace}/{name}" if kind and name else (kind or None)

    head: list[Diagnostic] = list(dup_errors)
    if "apiVersion" not in fields:
        head.append(Diagnostic(file, line, f"document {index}: missing required field \"apiVersion\"", obj_ref))
    elif api_version is None or not api_version:
        head.append(Diagnostic(file, _line(fields["apiVersion"][0]), "apiVersion must be a non-empty string",
                               obj_ref, "apiVersion"))
    if "kind" not in fields:
        head.append(Diagnostic(file, line, f"document {index}: missing required field \"kind\"", obj_ref))
    elif not kind:
        head.append(Diagnostic(file, _line(fields["kind"][0]), "kind must be a non-empty string", obj_ref, "kind"))
    if meta_node is None:
        head.append(Diagnostic(file, line, f"document {index}: missing required field \"metadata\" (with a name)",
                               obj_ref))
    elif not isinstance(meta_node, MappingNode):
        head.append(Diagnostic(file, _line(fields["metadata"][0]), f"must be an object, got {node_type_name(meta_node)}",
                               obj_ref, "metadata"))
    elif name_node is None:
        head.append(Diagnostic(file, _line(fields["metadata"][0]), "missing required field \"name\"",
                               obj_ref, "metadata.name"))
    elif not name:
        head.append(Diagnostic(file, _line(name_node), f"must be a non-empty string, got {node_type_name(name_node)}",
                               obj_ref, "metadata.name"))
    if head:
        res.errors.extend(head)
        return

    # kind: List (kubectl): expand items
    if api_version == "v1" and kind == "List":
        items = fields.get("items", (None, None))[1]
        if not isinstance(items, SequenceNode):
            res.errors.append(Diagnostic(file, line, "kind List needs an items list", "List"))
            return
        for item in items.value:
            _load_object(item, file, index, default_namespace, keys, res)
        return

    group, _, version = api_version.rpartition("/")
    src = m.SourceRef(file, line)
    ctx = Ctx(file, obj_ref, namespace)
    ctx.lines["apiVersion"] = _line(fields["apiVersion"][0])
    ctx.lines["kind"] = _line(fields["kind"][0])
    ctx.lines["metadata"] = _line(fields["metadata"][0])

    if group not in ISTIO_GROUPS:
        res.ignored.append(IgnoredObject(api_version, kind, namespace, name, src, istio=False))
        _check_metadata(meta_node, ctx, full=False)
        res.errors.extend(ctx.errors)
        return
    known = kinds_in_group(group)
    if kind not in known:
        res.errors.append(Diagnostic(file, ctx.lines["kind"],
                                     f'kind "{kind}" does not exist in API group {group} '
                                     f"(known kinds: {', '.join(sorted(known))})", obj_ref, "kind"))
        return
    if version not in known[kind]:
        res.errors.append(Diagnostic(file, ctx.lines["apiVersion"],
                                     f'{group} has no version "{version}" for {kind} '
                                     f"(served versions: {', '.join(known[kind])})", obj_ref, "apiVersion"))
        return
    if kind not in m.SPEC_KINDS:
        res.ignored.append(IgnoredObject(api_version, kind, namespace, name, src, istio=True))
        _check_metadata(meta_node, ctx, full=False)
        res.errors.extend(ctx.errors)
        return

    # an enforced kind: strict top level, metadata and spec
    for k, (knode, _v) in fields.items():
        if k not in _TOP_LEVEL:
            ctx.err(k, f'unknown field "{k}"', _line(knode))
    labels, annotations = _check_metadata(meta_node, ctx, full=True)
    spec_pair = fields.get("spec")
    if spec_pair is None or (isinstance(spec_pair[1], ScalarNode) and node_type_name(spec_pair[1]) == "null"):
        spec_node = MappingNode("tag:yaml.org,2002:map", [], start_mark=doc.start_mark, end_mark=doc.end_mark)
        ctx.lines["spec"] = line
    else:
        spec_node = spec_pair[1]
        ctx.lines["spec"] = _line(spec_pair[0])
    spec = decode_spec(kind, spec_node, ctx)
    res.warnings.extend(ctx.warnings)
    key = (kind, namespace, name)
    if key in keys:
        prev = keys[key]
        ctx.err("metadata.name", f"duplicate object: {kind} {namespace}/{name} is also defined at "
                                 f"{prev.file}:{prev.line}", _line(name_node))
    if ctx.errors:
        res.errors.extend(ctx.errors)
        return
    keys[key] = src
    raw = _construct(doc)
    res.resources.append(m.Resource(kind=kind, api_version=api_version, name=name, namespace=namespace,
                                    labels=labels, annotations=annotations, spec=spec, source=src,
                                    raw=raw))


def _check_metadata(meta: MappingNode, ctx: Ctx, full: bool):
    labels = annotations = m.EMPTY_MAP
    for knode, vnode in meta.value:
        k = _scalar_str(knode)
        path = f"metadata.{k}"
        ctx.lines[path] = _line(knode)
        if k == "name":
            v = _scalar_str(vnode)
            if v is None:
                ctx.err(path, f"must be a string, got {node_type_name(vnode)}")
            elif not is_dns1123_subdomain(v):
                ctx.err(path, f'invalid name "{v}": must be a lower-case DNS-1123 subdomain (letters a-z, '
                              f"digits, '-' and '.', starting and ending with a letter or digit, at most 253)")
        elif k == "namespace":
            v = _scalar_str(vnode)
            if v is None:
                ctx.err(path, f"must be a string, got {node_type_name(vnode)}")
            elif not is_dns1123_label(v):
                ctx.err(path, f'invalid namespace "{v}": must be a lower-case DNS-1123 label '
                              f"(letters a-z, digits and '-', at most 63)")
        elif not full:
            continue
        elif k in ("labels", "annotations"):
            if isinstance(vnode, ScalarNode) and node_type_name(vnode) == "null":
                continue
            v = decode(vnode, STRMAP, path, ctx)
            if v is INVALID:
                continue
            if k == "labels":
                labels = v
                validate_labels(v, path, ctx)
            else:
                annotations = v
        elif k not in _OBJECT_META:
            ctx.err(path, f'unknown field "{k}"')
    return labels, annotations


def load_file(path: str | os.PathLike, display: str | None = None, default_namespace: str = "default",
              known_keys: dict | None = None) -> LoadResult:
    shown = display if display is not None else str(path)
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return LoadResult(errors=[Diagnostic(shown, None, "no such file")], files=[shown])
    except IsADirectoryError:
        return LoadResult(errors=[Diagnostic(shown, None, "is a directory")], files=[shown])
    except OSError as exc:
        return LoadResult(errors=[Diagnostic(shown, None, f"cannot read: {exc.strerror or exc}")], files=[shown])
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        return LoadResult(errors=[Diagnostic(shown, line, "not UTF-8 text (is this a YAML file?)")], files=[shown])
    return load_text(text, shown, default_namespace, known_keys)


def config_files(directory: str | os.PathLike) -> list[Path]:
    """The YAML/JSON files of a directory (not recursive; hidden and temp files skipped), sorted."""
    d = Path(directory)
    out = []
    for p in sorted(d.iterdir(), key=lambda q: q.name):
        if p.name.startswith(".") or p.name.endswith("~"):
            continue
        if p.suffix.lower() in CONFIG_SUFFIXES and p.is_file():
            out.append(p)
    return out


def load_paths(paths: Iterable[str | os.PathLike], default_namespace: str = "default",
               recursive: bool = False) -> LoadResult:
    """Load files and directories (their *.yaml, *.yml, *.json files), in order, as ONE set:
    a duplicate object across files is an error."""
    res = LoadResult()
    keys: dict = {}
    for p in paths:
        ps = str(p)
        path = Path(ps)
        if path.is_dir():
            files = _walk(path) if recursive else config_files(path)
            if not files:
                res.warnings.append(Diagnostic(ps, None, "directory has no .yaml, .yml or .json files",
                                               severity="warning"))
            for f in files:
                res.extend(load_file(f, str(f), default_namespace, keys))
        else:
            res.extend(load_file(path, ps, default_namespace, keys))
    return res


def _walk(d: Path) -> list[Path]:
    out = config_files(d)
    for sub in sorted(q for q in d.iterdir() if q.is_dir() and not q.name.startswith(".")):
        out.extend(_walk(sub))
    return out
