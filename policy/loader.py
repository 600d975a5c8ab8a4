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

Pure: no I/O. Callers hand in the text (``load_text``) or the bytes (``load_bytes``);
reading files and directories is ``nodeagent.configfiles`` (the edge).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from policy import model as m
from policy.errors import ConfigError, Diagnostic
from policy.schema import ISTIO_GROUPS, NOT_ENFORCED, STRMAP, kinds_in_group
from policy.validate import (
    INVALID, Ctx, decode, decode_spec, is_dns1123_label, is_dns1123_subdomain, node_type_name,
    validate_labels,
)

__all__ = ["LoadResult", "IgnoredObject", "ObjectRef", "load_text", "load_bytes", "object_display"]

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


@dataclass(frozen=True, slots=True)
class ObjectRef:
    """What names a stored object (``identities_only`` loads): enough for ``delete -f``."""
    api_version: str
    kind: str
    namespace: str
    name: str
    namespace_given: str | None     # metadata.namespace as written (None: the default applied)
    source: m.SourceRef

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.kind, self.namespace, self.name)

    @property
    def ref(self) -> str:
        return f"{self.kind} {self.namespace}/{self.name}"


@dataclass
class LoadResult:
    resources: list[m.Resource] = field(default_factory=list)
    refs: list[ObjectRef] = field(default_factory=list)
    errors: list[Diagnostic] = field(default_factory=list)
    warnings: list[Diagnostic] = field(default_factory=list)
    ignored: list[IgnoredObject] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    # one Diagnostic per field that loaded but is not enforced (``warnings`` has one per file)
    unenforced: list[Diagnostic] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors

    def extend(self, other: "LoadResult") -> None:
        self.resources.extend(other.resources)
        self.refs.extend(other.refs)
        self.errors.extend(other.errors)
        self.warnings.extend(other.warnings)
        self.ignored.extend(other.ignored)
        self.files.extend(other.files)
        self.unenforced.extend(other.unenforced)

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


MAX_DEPTH = 1000
_NESTING_CHARS = "[{-?:\n"


def _too_deep(text: str) -> int | None:
    """The line where collections nest deeper than MAX_DEPTH, else None. libyaml's composer
    recurses in C and overflows the stack (a crash, not an exception) near 50000 levels.
    Every level takes one of ``[ { - ? :`` or a new line, so a text with few of those cannot
    be deep and is not scanned (the scan reads the parser's events: no recursion)."""
    if sum(text.count(c) for c in _NESTING_CHARS) <= MAX_DEPTH:
        return None
    depth = 0
    for ev in yaml.parse(text, Loader=YAML_LOADER):
        if isinstance(ev, (yaml.SequenceStartEvent, yaml.MappingStartEvent)):
            depth += 1
            if depth > MAX_DEPTH:
                return ev.start_mark.line + 1
        elif isinstance(ev, (yaml.SequenceEndEvent, yaml.MappingEndEvent)):
            depth -= 1
    return None


def load_text(text: str, file: str, default_namespace: str = "default",
              known_keys: dict | None = None, identities_only: bool = False) -> LoadResult:
    """Load every object of one YAML text. ``known_keys`` (key -> SourceRef) is shared
    across files to detect duplicate objects.

    ``identities_only``: read only what names each object (apiVersion, kind, metadata.name,
    metadata.namespace) into ``result.refs``, as ``delete -f`` needs: a spec is not decoded,
    so an object whose spec no longer validates can still be named. ``kind: List`` is expanded
    and the document-level checks apply the same way in both modes."""
    res = LoadResult(files=[file])
    keys = known_keys if known_keys is not None else {}
    docs: list[Node] = []
    try:
        too_deep = _too_deep(text)
        if too_deep is not None:
            res.errors.append(Diagnostic(file, too_deep, f"invalid YAML: nested more than {MAX_DEPTH} levels deep"))
            return res
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
        # kind: List is flattened with a work list (no recursion), nested Lists too, as kubectl does
        pending: list[tuple[Node, str]] = [(doc, f"document {index + 1}")]
        while pending:       # a stack: items are pushed in reverse so they load in order
            node, where = pending.pop()
            try:
                items = _load_object(node, file, where, default_namespace, keys, res, identities_only)
            except RecursionError:
                res.errors.append(Diagnostic(file, _line(node), f"{where}: nesting too deep"))
                continue
            except Exception as exc:  # a validator bug must not become a traceback for the user
                res.errors.append(Diagnostic(
                    file, _line(node), f"{where}: internal error while validating "
                                       f"({exc.__class__.__name__}: {exc}); please report this"))
                continue
            if items is None:
                count += 1
                continue
            prefix = f"{where[:-1]}." if where.endswith(")") else f"{where} (List item "
            pending.extend(reversed([(item, f"{prefix}{i})") for i, item in enumerate(items, 1)]))
    if count == 0 and not res.errors:
        res.warnings.append(Diagnostic(file, None, "no objects in this file (it is empty)", severity="warning"))
    if res.ignored:
        names = ", ".join(f"{o.ref} ({o.api_version}, line {o.source.line})" for o in res.ignored)
        what = "not stored by nodeagent, skipped" if identities_only else \
            "loaded but not enforced by nodeagent (ignored)"
        res.warnings.append(Diagnostic(file, res.ignored[0].source.line, f"{what}: {names}", severity="warning"))
    if res.unenforced:
        res.warnings.append(_unenforced_warning(res.unenforced))
    if res.errors:
        res.resources = []
        res.refs = []
        res.errors.sort(key=lambda d: d.line or 0)
    return res


def _unenforced_warning(diags: list[Diagnostic]) -> Diagnostic:
    """ONE warning for a file's unenforced fields: the first in full
    (``FILE:LINE: warning: Kind ns/name: spec.path: loaded but not enforced by nodeagent``),
    then the others as ``also spec.path (line N)``, naming the object when it changes."""
    first = diags[0]
    if len(diags) == 1:
        return first
    more = []
    obj = first.obj
    for d in diags[1:]:
        more.append(f"{d.path} (line {d.line})" if d.obj == obj else f"{d.obj} {d.path} (line {d.line})")
        obj = d.obj
    return Diagnostic(first.file, first.line, f"{NOT_ENFORCED}; also {', '.join(more)}", first.obj, first.path,
                      severity="warning")


_LIST_FIELDS = ("apiVersion", "kind", "metadata", "items")


def _load_object(doc: Node, file: str, where: str, default_namespace: str, keys: dict,
                 res: LoadResult, identities_only: bool = False) -> list[Node] | None:
    """Check and load one object. A ``kind: List`` returns its item nodes (for the caller to
    load in turn); anything else returns None after adding its result or errors to ``res``."""
    line = _line(doc)
    if not isinstance(doc, MappingNode):
        res.errors.append(Diagnostic(
            file, line, f"{where} must be a Kubernetes object (a mapping with apiVersion, kind "
                        f"and metadata), got {node_type_name(doc)}"))
        return None
    fields: dict[str, tuple[Node, Node]] = {}
    dup_errors = []
    for knode, vnode in doc.value:
        k = _scalar_str(knode)
        if k is None:
            dup_errors.append(Diagnostic(file, _line(knode), f"{where}: field names must be strings"))
            continue
        if k in fields:
            dup_errors.append(Diagnostic(file, _line(knode), f'{where}: duplicate field "{k}"'))
            continue
        fields[k] = (knode, vnode)

    api_version = _scalar_str(fields.get("apiVersion", (None, None))[1])
    kind = _scalar_str(fields.get("kind", (None, None))[1])
    meta_node = fields.get("metadata", (None, None))[1]

    # kind: List (kubectl): its metadata is a ListMeta (no name; often {resourceVersion: ""})
    if api_version == "v1" and kind == "List":
        errors = list(dup_errors)
        for k, (knode, _v) in fields.items():
            if k not in _LIST_FIELDS:
                import difflib  # only for a suggestion (0.13 MiB the agent need not keep)
                close = difflib.get_close_matches(k, _LIST_FIELDS, n=1)
                hint = f' (did you mean "{close[0]}"?)' if close else ""
                errors.append(Diagnostic(file, _line(knode), f'unknown field "{k}"{hint}', "List", k))
        if meta_node is not None and not isinstance(meta_node, MappingNode) and not _is_null(meta_node):
            errors.append(Diagnostic(file, _line(fields["metadata"][0]),
                                     f"must be an object, got {node_type_name(meta_node)}", "List", "metadata"))
        items = fields.get("items", (None, None))[1]
        if items is None or _is_null(items):
            items_list: list[Node] = []
        elif isinstance(items, SequenceNode):
            items_list = list(items.value)
        else:
            errors.append(Diagnostic(file, _line(fields["items"][0]),
                                     f"must be a list of objects, got {node_type_name(items)}", "List", "items"))
            items_list = []
        if errors:
            res.errors.extend(errors)
            return None
        return items_list

    meta_fields, meta_dups = _metadata_fields(meta_node)
    name_node = meta_fields.get("name", (None, None))[1]
    ns_node = meta_fields.get("namespace", (None, None))[1]
    name = _scalar_str(name_node) or ""
    ns_given = _scalar_str(ns_node) or None
    namespace = ns_given or default_namespace
    obj_ref = f"{kind} {namespace}/{name}" if kind and name else (kind or None)

    head: list[Diagnostic] = list(dup_errors)
    if "apiVersion" not in fields:
        head.append(Diagnostic(file, line, f"{where}: missing required field \"apiVersion\"", obj_ref))
    elif api_version is None or not api_version:
        head.append(Diagnostic(file, _line(fields["apiVersion"][0]), "apiVersion must be a non-empty string",
                               obj_ref, "apiVersion"))
    if "kind" not in fields:
        head.append(Diagnostic(file, line, f"{where}: missing required field \"kind\"", obj_ref))
    elif not kind:
        head.append(Diagnostic(file, _line(fields["kind"][0]), "kind must be a non-empty string", obj_ref, "kind"))
    if meta_node is None:
        head.append(Diagnostic(file, line, f"{where}: missing required field \"metadata\" (with a name)",
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
    # a field given twice in metadata (the name, the namespace) makes the identity ambiguous
    head.extend(Diagnostic(file, _line(knode), f'duplicate field "{k}"', obj_ref, f"metadata.{k}")
                for k, knode in meta_dups)
    if head:
        res.errors.extend(head)
        return None

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
        return None
    known = kinds_in_group(group)
    if kind not in known:
        res.errors.append(Diagnostic(file, ctx.lines["kind"],
                                     f'kind "{kind}" does not exist in API group {group} '
                                     f"(known kinds: {', '.join(sorted(known))})", obj_ref, "kind"))
        return None
    if version not in known[kind]:
        res.errors.append(Diagnostic(file, ctx.lines["apiVersion"],
                                     f'{group} has no version "{version}" for {kind} '
                                     f"(served versions: {', '.join(known[kind])})", obj_ref, "apiVersion"))
        return None
    if kind not in m.SPEC_KINDS:
        res.ignored.append(IgnoredObject(api_version, kind, namespace, name, src, istio=True))
        _check_metadata(meta_node, ctx, full=False)
        res.errors.extend(ctx.errors)
        return None

    if identities_only:
        _check_metadata(meta_node, ctx, full=False)
        if ctx.errors:
            res.errors.extend(ctx.errors)
        else:
            res.refs.append(ObjectRef(api_version, kind, namespace, name, ns_given, src))
        return None

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
    res.unenforced.extend(Diagnostic(file, ln, NOT_ENFORCED, obj_ref, path, severity="warning")
                          for path, ln in ctx.unenforced)
    key = (kind, namespace, name)
    if key in keys:
        prev = keys[key]
        ctx.err("metadata.name", f"duplicate object: {kind} {namespace}/{name} is also defined at "
                                 f"{prev.file}:{prev.line}", _line(name_node))
    if ctx.errors:
        res.errors.extend(ctx.errors)
        return None
    keys[key] = src
    raw = _construct(doc)
    res.resources.append(m.Resource(kind=kind, api_version=api_version, name=name, namespace=namespace,
                                    labels=labels, annotations=annotations, spec=spec, source=src,
                                    raw=raw))
    return None


def _is_null(node: Node) -> bool:
    return isinstance(node, ScalarNode) and node_type_name(node) == "null"


def _metadata_fields(meta: Node | None) -> tuple[dict[str, tuple[Node, Node]], list[tuple[str, Node]]]:
    """metadata's fields by name (the first of each) and the repeated ones (name, key node)."""
    out: dict[str, tuple[Node, Node]] = {}
    dups: list[tuple[str, Node]] = []
    if isinstance(meta, MappingNode):
        for knode, vnode in meta.value:
            k = _scalar_str(knode)
            if k is None:
                continue
            if k in out:
                dups.append((k, knode))
            else:
                out[k] = (knode, vnode)
    return out, dups


def _check_metadata(meta: MappingNode, ctx: Ctx, full: bool):
    labels = annotations = m.EMPTY_MAP
    seen: set = set()
    for knode, vnode in meta.value:
        k = _scalar_str(knode)
        if k in seen:
            continue    # a repeated field: reported with the object's identity
        seen.add(k)
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


def load_bytes(data: bytes, file: str, default_namespace: str = "default", known_keys: dict | None = None,
               identities_only: bool = False) -> LoadResult:
    """Decode UTF-8 (anything else is an error naming the line) and load: files and stdin alike."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        return LoadResult(errors=[Diagnostic(file, line, "not UTF-8 text (is this a YAML file?)")], files=[file])
    return load_text(text, file, default_namespace, known_keys, identities_only)
