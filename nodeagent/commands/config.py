"""Configuration commands, in the spirit of ``istioctl``/``kubectl``:

    nodeagent validate -f PATH [-f PATH ...]
    nodeagent apply    -f PATH [-n NS]
    nodeagent create   -f PATH [-n NS]
    nodeagent delete   -f PATH | KIND NAME [NAME ...] [-n NS] [--ignore-not-found]
    nodeagent get      KIND [NAME] [-n NS | -A] [-o yaml|json|name]

All work on ``--config-dir`` (else $NODEAGENT_CONFIG_DIR, else
/etc/nodeagent/config.d). PATH may be a file, a directory, or ``-`` (stdin).
Errors name file:line, object and field; the exit code is 1.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys

import yaml

from nodeagent.cli import UserError
from nodeagent.configfiles import load_paths, os_reason, path_problem
from nodeagent.store import ConfigStore, StoreError, _normalized_raw, resolve_config_dir
from policy import model as m
from policy.errors import ConfigError, Diagnostic
from policy.loader import LoadResult, load_bytes

# kind -> (plural, short names)
_KINDS = {
    "VirtualService": ("virtualservices", ("vs",)),
    "DestinationRule": ("destinationrules", ("dr",)),
    "ServiceEntry": ("serviceentries", ("se",)),
    "WorkloadEntry": ("workloadentries", ("we",)),
    "AuthorizationPolicy": ("authorizationpolicies", ("ap",)),
    "PeerAuthentication": ("peerauthentications", ("pa",)),
}


def resolve_kind(text: str) -> str:
    """``vs``, ``virtualservice``, ``VirtualServices``, ``virtualservices.networking.istio.io`` -> kind."""
    t = text.strip()
    base = t.split(".", 1)[0].lower()
    for kind, (plural, shorts) in _KINDS.items():
        if base in (kind.lower(), plural) or base in shorts:
            if "." in t:
                group = t.split(".", 1)[1].lower()
                if group != m.SPEC_KINDS[kind][0]:
                    break
            return kind
    known = ", ".join(f"{k.lower()} ({'/'.join(s)})" for k, (_, s) in _KINDS.items())
    raise UserError(f'the config store doesn\'t have a resource type "{text}" (known: {known})')


def register(sub: argparse._SubParsersAction) -> None:
    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config-dir", metavar="DIR",
                       help="configuration directory (default: $NODEAGENT_CONFIG_DIR or /etc/nodeagent/config.d)")

    p = sub.add_parser("validate", help="validate Istio configuration files (nothing is stored)",
                       description="Validate files or directories of Istio YAML. Exit 0 when valid "
                                   "(warnings on stderr), 1 with every error on stderr.")
    p.add_argument("-f", "--filename", action="append", required=True, metavar="PATH",
                   help="file or directory (repeatable; - for stdin)")
    p.add_argument("-R", "--recursive", action="store_true", help="also read sub-directories")
    p.set_defaults(func=cmd_validate)

    for name, help_ in (("apply", "create or update objects from files"),
                        ("create", "create objects from files (fails if one exists)")):
        p = sub.add_parser(name, help=help_)
        p.add_argument("-f", "--filename", action="append", required=True, metavar="PATH")
        p.add_argument("-R", "--recursive", action="store_true")
        p.add_argument("-n", "--namespace", help="namespace for objects that do not name one")
        common(p)
        p.set_defaults(func=cmd_apply if name == "apply" else cmd_create)

    p = sub.add_parser("delete", help="delete objects named in files, or KIND NAME")
    p.add_argument("kind", nargs="?", help="e.g. virtualservice, vs, dr, se, we, ap, pa")
    p.add_argument("names", nargs="*", metavar="NAME")
    p.add_argument("-f", "--filename", action="append", metavar="PATH")
    p.add_argument("-R", "--recursive", action="store_true")
    p.add_argument("-n", "--namespace", help="namespace (default: default)")
    p.add_argument("--ignore-not-found", action="store_true")
    common(p)
    p.set_defaults(func=cmd_delete)

    p = sub.add_parser("get", help="list or show stored objects")
    p.add_argument("kind", help="e.g. virtualservices, vs, dr, se, we, ap, pa, or 'all'")
    p.add_argument("name", nargs="?")
    p.add_argument("-n", "--namespace", help="namespace (default: default)")
    p.add_argument("-A", "--all-namespaces", action="store_true")
    p.add_argument("-o", "--output", choices=("yaml", "json", "name", "wide"), help="output format")
    common(p)
    p.set_defaults(func=cmd_get)


# -- helpers ----------------------------------------------------------------------


def _print_diags(diags, stream=None) -> None:
    stream = stream or sys.stderr
    for d in diags:
        print(str(d), file=stream)


def _load_inputs(paths: list[str], namespace: str | None, recursive: bool,
                 identities_only: bool = False) -> LoadResult:
    """Every ``-f`` input (files, directories, ``-`` for stdin) through the loader, as ONE set.
    ``identities_only``: names only (kind, namespace, name) into ``result.refs``, for delete."""
    ns = namespace or "default"
    result = LoadResult()
    keys: dict = {}
    for p in paths:
        if p == "-":
            # bytes, decoded as files are: the locale's text layer must not decide
            try:
                data = sys.stdin.buffer.read()
            except OSError as exc:
                result.errors.append(Diagnostic("<stdin>", None, f"cannot read: {os_reason(exc)}"))
                continue
            result.extend(load_bytes(data, "<stdin>", ns, keys, identities_only))
        else:   # every file-system problem comes back as an error naming the path
            result.extend(load_paths([p], ns, recursive=recursive, known_keys=keys,
                                     identities_only=identities_only))
    if namespace:
        given = [(r.source, r.ref, r.namespace_given) for r in result.refs]
        for r in result.resources:
            meta = r.raw.get("metadata") if isinstance(r.raw, dict) else None
            given.append((r.source, r.ref, meta.get("namespace") if isinstance(meta, dict) else None))
        for source, ref, ns_given in given:
            if ns_given and ns_given != namespace:
                result.errors.append(Diagnostic(
                    source.file, source.line,
                    f"the namespace from the provided object \"{ns_given}\" does not match the namespace "
                    f"\"{namespace}\" given with -n", ref, "metadata.namespace"))
    return result


def _require_valid(result: LoadResult, verb: str) -> None:
    _print_diags(result.warnings)
    if result.errors:
        _print_diags(result.errors)
        n = len(result.errors)
        raise UserError(f"{n} error{'s' if n != 1 else ''}: nothing was {verb}")


def _store(args) -> ConfigStore:
    directory, _explicit = resolve_config_dir(getattr(args, "config_dir", None))
    return ConfigStore(directory, allow_embedded=False)


def _store_for_read(args) -> ConfigStore:
    return ConfigStore(getattr(args, "config_dir", None))


def _run_store(fn, verb: str):
    try:
        return fn()
    except ConfigError as exc:
        _print_diags(exc.errors)
        raise UserError(f"the resulting configuration would be invalid ({len(exc.errors)} errors): "
                        f"nothing was {verb}") from None
    except StoreError as exc:
        raise UserError(str(exc)) from None
    except OSError as exc:
        where = exc.filename or "the configuration directory"
        raise UserError(f"{where}: cannot write: {os_reason(exc)}; nothing more was {verb}") from None


# -- commands ---------------------------------------------------------------------


def cmd_validate(args) -> int:
    result = _load_inputs(args.filename, None, args.recursive)
    _print_diags(result.warnings)
    if result.errors:
        _print_diags(result.errors)
        n = len(result.errors)
        raise UserError(f"configuration is invalid: {n} error{'s' if n != 1 else ''}")
    total = len(result.resources) + len(result.ignored)
    if total == 0:
        raise UserError("no objects found to validate")
    files = len(set(result.files))
    ignored = f", {len(result.ignored)} ignored" if result.ignored else ""
    print(f"valid: {len(result.resources)} objects in {files} file{'s' if files != 1 else ''}{ignored}")
    return 0


def _write(args, verb: str, method: str) -> int:
    result = _load_inputs(args.filename, args.namespace, args.recursive)
    _require_valid(result, verb)
    if not result.resources and not result.ignored:
        raise UserError(f"no objects passed to {'apply' if method == 'apply' else method}")
    store = _store(args)
    changes = _run_store(lambda: getattr(store, method)(result.resources), verb)
    for c in changes:
        print(f"{c.display} {c.action}")
    return 0


def cmd_apply(args) -> int:
    return _write(args, "applied", "apply")


def cmd_create(args) -> int:
    return _write(args, "created", "create")


def cmd_delete(args) -> int:
    keys: list[tuple[str, str, str]] = []
    if args.filename:
        if args.kind:
            raise UserError("give either -f PATH or KIND NAME, not both")
        keys = _keys_from_files(args.filename, args.namespace, args.recursive)
    else:
        if not args.kind or not args.names:
            raise UserError("delete needs -f PATH or KIND NAME [NAME ...] (e.g. nodeagent delete vs reviews -n shop)")
        kind = resolve_kind(args.kind)
        keys = [(kind, args.namespace or "default", n) for n in args.names]
    if not keys:
        raise UserError("no objects passed to delete")
    store = _store(args)
    changes = _run_store(lambda: store.delete(keys, ignore_not_found=args.ignore_not_found), "deleted")
    for c in changes:
        print(f"{c.display} deleted")
    return 0


def _keys_from_files(paths: list[str], namespace: str | None, recursive: bool) -> list[tuple[str, str, str]]:
    """Identities only (kind, namespace, name), read by the loader (``kind: List`` expanded, same
    document checks): deleting must work even when a spec no longer validates."""
    result = _load_inputs(paths, namespace, recursive, identities_only=True)
    _require_valid(result, "deleted")
    return [r.key for r in result.refs]


def _quiet_broken_pipe(fn):
    """`nodeagent get ... | head` must end quietly when the reader goes away."""
    @functools.wraps(fn)
    def wrapper(args):
        try:
            rc = fn(args)
            sys.stdout.flush()
            return rc
        except BrokenPipeError:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            return 0
    return wrapper


@_quiet_broken_pipe
def cmd_get(args) -> int:
    store = _store_for_read(args)
    if not store.embedded:
        problem = path_problem(store.directory)
        if problem == "config directory does not exist":
            raise UserError(f"config directory {store.directory} does not exist")
        if problem is not None:
            raise UserError(f"{store.directory}: {problem}")
    kinds = list(_KINDS) if args.kind.lower() == "all" else [resolve_kind(args.kind)]
    try:
        objects = store.objects()
    except ConfigError as exc:
        _print_diags(exc.errors)
        raise UserError(f"the configuration in {store.directory} is invalid") from None
    except StoreError as exc:
        raise UserError(str(exc)) from None
    if store.embedded:
        print(f"(serving the {store.describe()})", file=sys.stderr)
    ns = None if args.all_namespaces else (args.namespace or "default")
    found = [r for r in objects if r.kind in kinds and (ns is None or r.namespace == ns)
             and (args.name is None or r.name == args.name)]
    found.sort(key=lambda r: (kinds.index(r.kind), r.namespace, r.name))
    if args.name is not None and not found:
        raise UserError(f'{_KINDS[kinds[0]][0]}.{m.SPEC_KINDS[kinds[0]][0]} "{args.name}" not found'
                        + (f" in namespace {ns}" if ns else ""))
    if args.output in ("yaml", "json"):
        items = [_normalized_raw(r) for r in found]
        # as kubectl prints it; ``apply -f`` and ``delete -f`` read it back
        doc = items[0] if args.name is not None and len(items) == 1 else \
            {"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": ""}, "items": items}
        if args.output == "yaml":
            sys.stdout.write(yaml.safe_dump(doc, sort_keys=False, default_flow_style=False))
        else:
            print(json.dumps(doc, indent=2, default=str))
        return 0
    if args.output == "name":
        for r in found:
            print(f"{r.kind.lower()}.{m.SPEC_KINDS[r.kind][0]}/{r.name}")
        return 0
    if not found:
        where = "any namespace" if ns is None else f"{ns} namespace"
        print(f"No resources found in {where}.", file=sys.stderr)
        return 0
    _print_table(found, show_ns=ns is None, multi_kind=len(kinds) > 1)
    return 0


def _columns(r: m.Resource) -> list[str]:
    s = r.spec
    if r.kind == "VirtualService":
        return [",".join(s.gateways) or "-", ",".join(s.hosts)]
    if r.kind == "DestinationRule":
        return [s.host, ",".join(x.name for x in s.subsets) or "-"]
    if r.kind == "ServiceEntry":
        return [",".join(s.hosts), s.location or "MESH_EXTERNAL", s.resolution or "NONE"]
    if r.kind == "WorkloadEntry":
        return [s.address or "-", s.service_account or "default"]
    if r.kind == "AuthorizationPolicy":
        return [s.action, str(len(s.rules))]
    if r.kind == "PeerAuthentication":
        return [s.mtls.mode if s.mtls else "UNSET"]
    return []


_HEADERS = {
    "VirtualService": ["GATEWAYS", "HOSTS"],
    "DestinationRule": ["HOST", "SUBSETS"],
    "ServiceEntry": ["HOSTS", "LOCATION", "RESOLUTION"],
    "WorkloadEntry": ["ADDRESS", "SERVICE-ACCOUNT"],
    "AuthorizationPolicy": ["ACTION", "RULES"],
    "PeerAuthentication": ["MODE"],
}


def _print_table(found: list[m.Resource], show_ns: bool, multi_kind: bool) -> None:
    groups: dict[str, list[m.Resource]] = {}
    for r in found:
        groups.setdefault(r.kind, []).append(r)
    first = True
    for kind, rs in groups.items():
        if not first:
            print()
        first = False
        header = (["NAMESPACE"] if show_ns else []) + ["NAME"] + _HEADERS[kind]
        rows = []
        for r in rs:
            name = f"{r.kind.lower()}.{m.SPEC_KINDS[kind][0]}/{r.name}" if multi_kind else r.name
            rows.append(([r.namespace] if show_ns else []) + [name] + _columns(r))
        widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
        for row in [header] + rows:
            print("   ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip())
