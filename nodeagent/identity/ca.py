"""The CA: a directory holding the roots, the placement registry and the
revocation list, and ``LocalCA`` which signs CSRs from it.

Layout of a CA directory (mode 0700; every ``*.key`` is 0600)::

    ca.json            trust domain, leaf lifetime cap, roots (name, created, active_from)
    roots/root-N.pem   root certificates          roots/root-N.key  their keys
    placements.json    {"nodes": {"<node>": ["<ns>/<sa>", ...]}}  -- who may get what
    revocations.json   {"version": N, "serials": [...], "identities": [...]}
    issued.jsonl       one line per issued certificate (serial, identity, node, root, validity)

Every request reads the files again, so ``nodeagent ca place`` or ``revoke`` take
effect on a running ``ca serve`` without a restart. Writers hold ``.lock``
(flock) and replace files atomically.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from . import certs
from .errors import CAError, SigningRefused
from .spiffe import DEFAULT_TRUST_DOMAIN, InvalidSpiffeId, SpiffeId, check_name, check_trust_domain
from .trust import IssuedCertificate, RevocationList, TrustBundle

log = logging.getLogger(__name__)

DEFAULT_LEAF_LIFETIME = 24 * 3600.0
DEFAULT_ROOT_LIFETIME = 10 * 365 * 24 * 3600.0
DEFAULT_NODE_CREDENTIAL_DAYS = 90
MIN_LEAF_LIFETIME = 60.0

NODE_KEY_FILE = "node.key"
NODE_CERT_FILE = "node.pem"
ROOTS_FILE = "ca-roots.pem"


def write_file_atomic(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to ``path`` via a temporary file created with ``mode`` (never wider)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb", closefd=False) as f:
            f.write(data)
            f.flush()
            os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def make_private_dir(path: Path) -> None:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)


@dataclass(frozen=True, slots=True)
class RootInfo:
    name: str
    created: float
    active_from: float
    certificate: x509.Certificate


class CADirectory:
    """All state of a CA, on disk. Methods take ``now`` so tests control time."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._config_file = self.path / "ca.json"
        # root name -> (the key file's identity, the parsed key): parsing a PEM key costs
        # ~0.35 ms with OpenSSL 3.0's decoders (Debian's cryptography), once per signed leaf.
        self._keys: dict[str, tuple[tuple, ec.EllipticCurvePrivateKey]] = {}
        if not self._config_file.is_file():
            raise CAError(f"{self.path} is not a CA directory (no ca.json); "
                          f"create one with `nodeagent ca init --dir {self.path}`")

    # ---- creation -------------------------------------------------------------------

    @classmethod
    def init(cls, path: str | os.PathLike, *, trust_domain: str = DEFAULT_TRUST_DOMAIN,
             now: float | None = None, root_lifetime: float = DEFAULT_ROOT_LIFETIME,
             max_leaf_lifetime: float = DEFAULT_LEAF_LIFETIME) -> "CADirectory":
        """Create the CA once; refuse if ``path`` already holds a CA or a root key."""
        path = Path(path)
        try:
            check_trust_domain(trust_domain)
        except InvalidSpiffeId as exc:
            raise CAError(str(exc)) from None
        if max_leaf_lifetime < MIN_LEAF_LIFETIME:
            raise CAError(f"leaf lifetime must be at least {MIN_LEAF_LIFETIME:.0f} s")
        if (path / "ca.json").exists() or (path / "roots").exists():
            raise CAError(f"{path} already holds a CA; refusing to overwrite its root "
                          "(use `nodeagent ca rotate-root` to change roots)")
        now = time.time() if now is None else now
        make_private_dir(path)
        make_private_dir(path / "roots")
        config = {"trust_domain": trust_domain, "max_leaf_lifetime": max_leaf_lifetime, "roots": []}
        ca = cls.__new__(cls)
        ca.path = path
        ca._config_file = path / "ca.json"
        with ca._locked():
            ca._add_root(config, now=now, lifetime=root_lifetime, active_from=now)
            write_file_atomic(path / "placements.json", b'{"nodes": {}}\n', 0o600)
            write_file_atomic(path / "revocations.json",
                              json.dumps(RevocationList().to_json()).encode() + b"\n", 0o600)
        return cls(path)

    @classmethod
    def open_or_init(cls, path: str | os.PathLike, *, trust_domain: str = DEFAULT_TRUST_DOMAIN,
                     now: float | None = None) -> "CADirectory":
        """The embedded single-node CA: created on first run in the state directory."""
        if (Path(path) / "ca.json").is_file():
            ca = cls(path)
            if ca.trust_domain != trust_domain:
                raise CAError(f"{ca._config_file}: the CA's trust domain is {ca.trust_domain!r} "
                              f"but {trust_domain!r} was configured")
            return ca
        return cls.init(path, trust_domain=trust_domain, now=now)

    # ---- config and roots -----------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self):
        fd = os.open(self.path / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _read_json(self, name: str) -> dict:
        file = self.path / name
        try:
            data = json.loads(file.read_bytes())
        except FileNotFoundError:
            raise CAError(f"{file} is missing; the CA directory is incomplete") from None
        except ValueError as exc:
            raise CAError(f"{file}: not valid JSON ({exc})") from None
        if not isinstance(data, dict):
            raise CAError(f"{file}: must hold a JSON object")
        return data

    def _write_json(self, name: str, data: dict) -> None:
        write_file_atomic(self.path / name, json.dumps(data, indent=1, sort_keys=True).encode() + b"\n",
                          0o600)

    def _config(self) -> dict:
        return self._read_json("ca.json")

    @property
    def trust_domain(self) -> str:
        return self._config()["trust_domain"]

    @property
    def max_leaf_lifetime(self) -> float:
        return float(self._config()["max_leaf_lifetime"])

    def _add_root(self, config: dict, *, now: float, lifetime: float, active_from: float) -> RootInfo:
        generation = 1 + max((int(r["name"].split("-")[1]) for r in config["roots"]), default=0)
        name = f"root-{generation}"
        key = certs.generate_key()
        cert = certs.make_root(key, config["trust_domain"], now=now, lifetime=lifetime,
                               generation=generation)
        write_file_atomic(self.path / "roots" / f"{name}.key", certs.key_to_pem(key), 0o600)
        write_file_atomic(self.path / "roots" / f"{name}.pem", certs.cert_to_pem(cert), 0o644)
        config["roots"].append({"name": name, "created": now, "active_from": active_from})
        self._write_json("ca.json", config)
        return RootInfo(name, now, active_from, cert)

    def roots(self) -> list[RootInfo]:
        out = []
        for entry in self._config()["roots"]:
            pem_file = self.path / "roots" / f"{entry['name']}.pem"
            try:
                cert = x509.load_pem_x509_certificate(pem_file.read_bytes())
            except (OSError, ValueError) as exc:
                raise CAError(f"{pem_file}: cannot read root certificate ({exc})") from None
            out.append(RootInfo(entry["name"], float(entry["created"]), float(entry["active_from"]), cert))
        return out

    def active_root(self, now: float) -> RootInfo:
        active = [r for r in self.roots() if r.active_from <= now]
        if not active:
            raise CAError(f"{self._config_file}: no root is active yet")
        return max(active, key=lambda r: r.created)

    def _root_key(self, root: RootInfo) -> ec.EllipticCurvePrivateKey:
        """The root's private key: parsed again only when its file changed (device, inode,
        size, mtime), so a key replaced on disk is the one used."""
        key_file = self.path / "roots" / f"{root.name}.key"
        try:
            st = key_file.stat()
            stamp = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
            cached = self._keys.get(root.name)
            if cached is not None and cached[0] == stamp:
                return cached[1]
            key = certs.load_key(key_file.read_bytes())
        except (OSError, ValueError) as exc:
            # The message names the file only; key material never reaches a log.
            raise CAError(f"{key_file}: cannot load the root key ({type(exc).__name__})") from None
        self._keys[root.name] = (stamp, key)
        return key

    def trust_bundle(self, now: float) -> TrustBundle:
        """All roots, the one signing at ``now`` first."""
        active = self.active_root(now)
        rest = [r.certificate for r in self.roots() if r.name != active.name]
        return TrustBundle((active.certificate, *rest))

    def rotate_root(self, *, now: float, activate_after: float = 0.0,
                    lifetime: float = DEFAULT_ROOT_LIFETIME) -> RootInfo:
        """Add a new root. It is in the bundle at once and signs new leaves after
        ``activate_after`` seconds (time for every agent to fetch the bundle)."""
        with self._locked():
            config = self._config()
            if len(config["roots"]) > 1:
                names = ", ".join(r["name"] for r in config["roots"])
                raise CAError(f"a rotation is already in progress (roots: {names}); finish it with "
                              "`nodeagent ca retire-root` first")
            return self._add_root(config, now=now, lifetime=lifetime, active_from=now + activate_after)

    def retire_root(self, *, now: float, force: bool = False) -> list[str]:
        """Drop every root but the active one, once no valid certificate needs them."""
        with self._locked():
            config = self._config()
            roots = self.roots()
            if len(roots) < 2:
                raise CAError("there is only one root; nothing to retire")
            active = self.active_root(now)
            pending = [r for r in roots if r.active_from > now]
            if pending:
                raise CAError(f"{pending[0].name} becomes active at {_fmt(pending[0].active_from)}; "
                              "retire the old root after that")
            retiring = [r for r in roots if r.name != active.name]
            if not force:
                wait_until = active.active_from + self.max_leaf_lifetime
                if now < wait_until:
                    raise CAError(f"workload certificates signed by {retiring[0].name} may be valid "
                                  f"until {_fmt(wait_until)}; retire after that, or pass --force")
                names = {r.name for r in retiring}
                still = [e for e in self.issued() if e.get("root") in names
                         and e.get("kind") == "node" and float(e["not_after"]) > now
                         and int(e["serial"], 16) not in self.revocation_list().serials]
                if still:
                    listed = ", ".join(sorted(f"{e['node']} serial {e['serial']}" for e in still))
                    raise CAError(f"node credentials signed by the old root are still valid ({listed}); "
                                  "issue new ones with `nodeagent ca node-credential --replace` and "
                                  "revoke the old serials, or pass --force")
            config["roots"] = [e for e in config["roots"] if e["name"] == active.name]
            self._write_json("ca.json", config)
            for r in retiring:
                for suffix in (".key", ".pem"):
                    (self.path / "roots" / f"{r.name}{suffix}").unlink(missing_ok=True)
            return [r.name for r in retiring]

    # ---- placement registry ---------------------------------------------------------

    def placements(self) -> dict[str, frozenset[tuple[str, str]]]:
        data = self._read_json("placements.json")
        nodes = data.get("nodes", {})
        out = {}
        for node, entries in nodes.items():
            pairs = set()
            for entry in entries:
                ns, _, sa = str(entry).partition("/")
                pairs.add((ns, sa))
            out[node] = frozenset(pairs)
        return out

    def is_placed(self, node: str, identity: SpiffeId) -> bool:
        return (identity.namespace, identity.service_account) in self.placements().get(node, frozenset())

    def _edit_placement(self, node: str, namespace: str, service_account: str, add: bool) -> bool:
        try:
            check_name("node name", node)
            check_name("namespace", namespace)
            check_name("service account", service_account)
        except InvalidSpiffeId as exc:
            raise CAError(str(exc)) from None
        with self._locked():
            data = self._read_json("placements.json")
            nodes = data.setdefault("nodes", {})
            entries = set(nodes.get(node, []))
            entry = f"{namespace}/{service_account}"
            changed = (entry not in entries) if add else (entry in entries)
            entries = entries | {entry} if add else entries - {entry}
            if entries:
                nodes[node] = sorted(entries)
            else:
                nodes.pop(node, None)
            self._write_json("placements.json", data)
            return changed

    def place(self, node: str, namespace: str, service_account: str) -> bool:
        return self._edit_placement(node, namespace, service_account, add=True)

    def unplace(self, node: str, namespace: str, service_account: str) -> bool:
        return self._edit_placement(node, namespace, service_account, add=False)

    # ---- revocation -----------------------------------------------------------------

    def revocation_list(self) -> RevocationList:
        return RevocationList.from_json(self._read_json("revocations.json"),
                                        str(self.path / "revocations.json"))

    def _revoke(self, serial: int | None = None, identity: SpiffeId | None = None) -> RevocationList:
        with self._locked():
            current = self.revocation_list()
            serials = current.serials | ({serial} if serial is not None else set())
            identities = current.identities | ({identity.uri} if identity is not None else set())
            updated = RevocationList(current.version + 1, frozenset(serials), frozenset(identities))
            self._write_json("revocations.json", updated.to_json())
            return updated

    def unrevoke_identity(self, identity: SpiffeId) -> RevocationList:
        """Lift an identity revocation (serial revocations are permanent)."""
        with self._locked():
            current = self.revocation_list()
            if identity.uri not in current.identities:
                raise CAError(f"{identity} is not revoked")
            updated = RevocationList(current.version + 1, current.serials,
                                     current.identities - {identity.uri})
            self._write_json("revocations.json", updated.to_json())
            return updated

    def revoke_serial(self, serial: int) -> RevocationList:
        return self._revoke(serial=serial)

    def revoke_identity(self, identity: SpiffeId) -> RevocationList:
        if identity.trust_domain != self.trust_domain:
            raise CAError(f"{identity} is not in this CA's trust domain {self.trust_domain}")
        return self._revoke(identity=identity)

    # ---- issuance -------------------------------------------------------------------

    def issued(self) -> list[dict]:
        file = self.path / "issued.jsonl"
        try:
            lines = file.read_text().splitlines()
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in lines if line.strip()]

    def _record(self, cert: x509.Certificate, root: RootInfo, kind: str, node: str | None) -> None:
        entry = {"serial": certs.serial_hex(cert.serial_number), "kind": kind, "node": node,
                 "identity": certs.uri_sans(cert)[0] if certs.uri_sans(cert) else None,
                 "root": root.name, "not_before": certs.not_before(cert),
                 "not_after": certs.not_after(cert)}
        fd = os.open(self.path / "issued.jsonl", os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                     0o600)
        try:
            os.write(fd, json.dumps(entry, sort_keys=True).encode() + b"\n")
        finally:
            os.close(fd)

    def sign(self, request: certs.LeafRequest, *, kind: str, node: str | None, now: float,
             root: RootInfo | None = None) -> IssuedCertificate:
        """Sign with ``root``, by default the root active at ``now``."""
        root = root or self.active_root(now)
        cert = certs.sign_leaf(request, root.certificate, self._root_key(root))
        if kind != "serving":
            self._record(cert, root, kind, node)
        return IssuedCertificate(cert, (root.certificate,))


def _fmt(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ts))


class LocalCA:
    """Signs workload CSRs straight from a CA directory.

    Used by the daemon without ``--ca-url`` (single node: every identity is
    local, so no placement check) and by ``ca serve`` with ``node=`` set (the
    placement registry must place the identity on that node). Implements the
    ``CAClient`` protocol of ``nodeagent.identity.manager``.
    """

    def __init__(self, directory: CADirectory, *, clock=time.time):
        self.directory = directory
        self._clock = clock

    @property
    def trust_domain(self) -> str:
        return self.directory.trust_domain

    def sign_csr(self, csr_pem: bytes, identity: SpiffeId | str, lifetime: float | None = None, *,
                 node: str | None = None, now: float | None = None) -> IssuedCertificate:
        """Check and sign. Only the requested SPIFFE ID goes into the certificate,
        whatever else the CSR asks for; the CA caps the lifetime."""
        now = self._clock() if now is None else now
        try:
            if isinstance(identity, str):
                identity = SpiffeId.parse(identity)
        except InvalidSpiffeId as exc:
            raise CAError(f"requested identity: {exc}") from None
        if not identity.is_workload:
            raise SigningRefused(f"{identity} is not a workload identity (spiffe://<td>/ns/<ns>/sa/<sa>)")
        td = self.directory.trust_domain
        if identity.trust_domain != td:
            raise SigningRefused(f"{identity} is outside this CA's trust domain {td}")
        try:
            csr = certs.load_csr(csr_pem)
        except certs.CertificateError as exc:
            raise CAError(f"bad CSR: {exc}") from None
        if node is not None and not self.directory.is_placed(node, identity):
            raise SigningRefused(
                f"the registry does not place {identity.namespace}/{identity.service_account} on node "
                f"{node}; an operator must run `nodeagent ca place --node {node} --namespace "
                f"{identity.namespace} --service-account {identity.service_account}`")
        if identity.uri in self.directory.revocation_list().identities:
            raise SigningRefused(f"identity {identity} is revoked")
        cap = self.directory.max_leaf_lifetime
        lifetime = cap if lifetime is None else max(MIN_LEAF_LIFETIME, min(float(lifetime), cap))
        request = certs.LeafRequest(identity, csr.public_key(),
                                    not_before=now - certs.CLOCK_SKEW_ALLOWANCE,
                                    not_after=now + lifetime)
        issued = self.directory.sign(request, kind="workload", node=node, now=now)
        log.info("issued %s serial %s to %s until %s", identity, certs.serial_hex(issued.serial),
                 node or "local agent", _fmt(issued.not_after))
        return issued

    # CAClient protocol
    async def sign(self, csr_pem: bytes, identity: SpiffeId, lifetime: float) -> IssuedCertificate:
        return self.sign_csr(csr_pem, identity, lifetime)

    async def trust_bundle(self) -> TrustBundle:
        return self.directory.trust_bundle(self._clock())

    async def revocation_list(self) -> RevocationList:
        return self.directory.revocation_list()


def issue_node_credential(directory: CADirectory, node: str, out_dir: str | os.PathLike, *,
                          days: float = DEFAULT_NODE_CREDENTIAL_DAYS, replace: bool = False,
                          now: float | None = None) -> IssuedCertificate:
    """Make a client certificate for ``spiffe://<td>/node/<node>`` and write
    ``node.key`` (0600), ``node.pem`` and ``ca-roots.pem`` into ``out_dir`` (0700)."""
    now = time.time() if now is None else now
    try:
        identity = SpiffeId.for_node(node, directory.trust_domain)
    except InvalidSpiffeId as exc:
        raise CAError(str(exc)) from None
    out = Path(out_dir)
    if (out / NODE_KEY_FILE).exists() and not replace:
        raise CAError(f"{out / NODE_KEY_FILE} exists; pass --replace to rotate the node credential")
    if days <= 0:
        raise CAError("--days must be positive")
    make_private_dir(out)
    key = certs.generate_key()
    request = certs.LeafRequest(identity, key.public_key(), not_before=now - certs.CLOCK_SKEW_ALLOWANCE,
                                not_after=now + days * 86400)
    issued = directory.sign(request, kind="node", node=node, now=now)
    write_file_atomic(out / NODE_KEY_FILE, certs.key_to_pem(key), 0o600)
    write_file_atomic(out / NODE_CERT_FILE, certs.certs_to_pem((issued.certificate, *issued.chain)), 0o644)
    write_file_atomic(out / ROOTS_FILE, directory.trust_bundle(now).pem, 0o644)
    return issued
