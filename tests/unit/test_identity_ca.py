"""The CA directory, LocalCA signing rules and the `nodeagent ca` commands
(files in a temporary directory; no sockets)."""
from __future__ import annotations

import argparse
import json
import os
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from nodeagent.cli import UserError
from nodeagent.commands import ca as ca_command
from nodeagent.identity import certs
from nodeagent.identity.ca import CADirectory, LocalCA, issue_node_credential
from nodeagent.identity.errors import CAError, SigningRefused
from nodeagent.identity.spiffe import SpiffeId
from nodeagent.identity.trust import RevocationList

NOW = 1_800_000_000.0
WEB = SpiffeId.workload("shop", "web")


def cli(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    ca_command.register(parser.add_subparsers())
    args = parser.parse_args(["ca", *argv])
    return args.func(args)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture(scope="module")
def key():
    return certs.generate_key()


@pytest.fixture
def ca_dir(tmp_path):
    return CADirectory.init(tmp_path / "ca", now=NOW)


@pytest.fixture
def live_ca_dir(tmp_path):
    """For the commands, which use the wall clock."""
    return CADirectory.init(tmp_path / "ca")


def test_init_modes_and_refuses_to_overwrite(tmp_path, capsys, caplog):
    caplog.set_level("DEBUG")
    assert cli("init", "--dir", str(tmp_path / "ca"), "--trust-domain", "example.org") == 0
    out = capsys.readouterr().out
    key_file = tmp_path / "ca" / "roots" / "root-1.key"
    assert mode(tmp_path / "ca") == 0o700
    assert mode(key_file) == 0o600
    assert "PRIVATE KEY" not in out and key_file.read_text().splitlines()[1] not in out
    cli("node-credential", "--dir", str(tmp_path / "ca"), "--node", "n1", "--out", str(tmp_path / "n1"))
    local = LocalCA(CADirectory(tmp_path / "ca"))
    local.sign_csr(certs.make_csr(certs.generate_key(), SpiffeId.workload("a", "b", "example.org")),
                   "spiffe://example.org/ns/a/sa/b")
    logged = caplog.text + capsys.readouterr().out
    assert "issued spiffe://example.org/ns/a/sa/b" in logged
    for secret in (key_file, tmp_path / "n1" / "node.key"):
        assert secret.read_text().splitlines()[1] not in logged
    assert "PRIVATE KEY" not in logged
    assert CADirectory(tmp_path / "ca").trust_domain == "example.org"
    before = key_file.read_bytes()
    with pytest.raises(UserError, match="already holds a CA; refusing to overwrite"):
        cli("init", "--dir", str(tmp_path / "ca"))
    assert key_file.read_bytes() == before


def test_open_missing_dir_says_what_to_do(tmp_path):
    with pytest.raises(UserError, match="nodeagent ca init --dir"):
        cli("status", "--dir", str(tmp_path / "nothing"))


def test_local_ca_puts_only_the_requested_id_and_caps_lifetime(ca_dir, key):
    # A CSR asking for extra names: a DNS name and someone else's SPIFFE ID.
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([]))
           .add_extension(x509.SubjectAlternativeName([
               x509.UniformResourceIdentifier("spiffe://cluster.local/ns/kube-system/sa/admin"),
               x509.DNSName("evil.example")]), critical=False)
           .sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))
    issued = LocalCA(ca_dir, clock=lambda: NOW).sign_csr(csr, WEB, lifetime=10 * 86400)
    san = issued.certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert list(san) == [x509.UniformResourceIdentifier(WEB.uri)]
    assert issued.not_after == NOW + 86400  # capped at the CA's 24 h
    assert issued.not_before == NOW - certs.CLOCK_SKEW_ALLOWANCE
    assert certs.public_keys_equal(issued.certificate.public_key(), key.public_key())
    assert certs.issued_by(issued.certificate, ca_dir.roots()[0].certificate)
    logged = ca_dir.issued()[-1]
    assert logged["serial"] == certs.serial_hex(issued.serial) and logged["identity"] == WEB.uri
    assert "KEY" not in json.dumps(ca_dir.issued())


def test_local_ca_refusals(ca_dir, key):
    local = LocalCA(ca_dir, clock=lambda: NOW)
    csr = certs.make_csr(key, WEB)
    with pytest.raises(SigningRefused, match="outside this CA's trust domain"):
        local.sign_csr(csr, SpiffeId.workload("shop", "web", "other.org"))
    with pytest.raises(SigningRefused, match="not a workload identity"):
        local.sign_csr(csr, SpiffeId.for_node("n1"))
    with pytest.raises(CAError, match="bad CSR"):
        local.sign_csr(b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n", WEB)
    with pytest.raises(SigningRefused, match="does not place shop/web on node n1"):
        local.sign_csr(csr, WEB, node="n1")
    ca_dir.place("n1", "shop", "web")
    assert local.sign_csr(csr, WEB, node="n1").identity == WEB
    with pytest.raises(SigningRefused, match="does not place shop/web on node n2"):
        local.sign_csr(csr, WEB, node="n2")
    ca_dir.revoke_identity(WEB)
    with pytest.raises(SigningRefused, match="revoked"):
        local.sign_csr(csr, WEB)


def test_place_unplace_commands_edit_the_registry(live_ca_dir, capsys):
    d = str(live_ca_dir.path)
    cli("place", "--dir", d, "--node", "n1", "--namespace", "shop", "--service-account", "web")
    cli("place", "--dir", d, "--node", "n1", "--namespace", "shop", "--service-account", "db")
    assert live_ca_dir.placements() == {"n1": frozenset({("shop", "web"), ("shop", "db")})}
    assert live_ca_dir.is_placed("n1", WEB)
    cli("unplace", "--dir", d, "--node", "n1", "--namespace", "shop", "--service-account", "web")
    assert not live_ca_dir.is_placed("n1", WEB)
    assert "removed from node n1" in capsys.readouterr().out
    with pytest.raises(UserError, match="node name 'N_1'"):
        cli("place", "--dir", d, "--node", "N_1", "--namespace", "shop", "--service-account", "web")
    assert mode(live_ca_dir.path / "placements.json") == 0o600


def test_revoke_command_bumps_the_version(live_ca_dir, key):
    issued = LocalCA(live_ca_dir).sign_csr(certs.make_csr(key, WEB), WEB)
    cli("revoke", "--dir", str(live_ca_dir.path), "--serial", certs.serial_hex(issued.serial))
    cli("revoke", "--dir", str(live_ca_dir.path), "--identity", "spiffe://cluster.local/ns/shop/sa/db")
    rl = live_ca_dir.revocation_list()
    assert rl.version == 2
    assert rl.serials == {issued.serial}
    assert rl.identities == {"spiffe://cluster.local/ns/shop/sa/db"}
    assert rl.revoked_reason(issued.certificate) == f"certificate serial {certs.serial_hex(issued.serial)} is revoked"
    cli("unrevoke", "--dir", str(live_ca_dir.path), "--identity", "spiffe://cluster.local/ns/shop/sa/db")
    assert live_ca_dir.revocation_list() == RevocationList(3, frozenset({issued.serial}), frozenset())
    with pytest.raises(UserError, match="is not revoked"):
        cli("unrevoke", "--dir", str(live_ca_dir.path), "--identity", "spiffe://cluster.local/ns/shop/sa/db")
    with pytest.raises(UserError, match="not a hexadecimal"):
        cli("revoke", "--dir", str(live_ca_dir.path), "--serial", "zz")
    with pytest.raises(UserError, match="not a SPIFFE ID"):
        cli("revoke", "--dir", str(live_ca_dir.path), "--identity", "shop/db")


def test_node_credential_files(live_ca_dir, tmp_path, capsys):
    out = tmp_path / "cred"
    assert cli("node-credential", "--dir", str(live_ca_dir.path), "--node", "n1", "--out", str(out)) == 0
    printed = capsys.readouterr().out
    assert mode(out) == 0o700 and mode(out / "node.key") == 0o600
    assert "PRIVATE KEY" not in printed
    chain = certs.load_certs((out / "node.pem").read_bytes())
    assert certs.spiffe_id_of(chain[0]) == SpiffeId.for_node("n1")
    assert certs.load_certs((out / "ca-roots.pem").read_bytes()) == (live_ca_dir.roots()[0].certificate,)
    assert certs.public_keys_equal(certs.load_key((out / "node.key").read_bytes()).public_key(),
                                   chain[0].public_key())
    with pytest.raises(UserError, match="--replace"):
        cli("node-credential", "--dir", str(live_ca_dir.path), "--node", "n1", "--out", str(out))
    old = (out / "node.key").read_bytes()
    cli("node-credential", "--dir", str(live_ca_dir.path), "--node", "n1", "--out", str(out), "--replace")
    assert (out / "node.key").read_bytes() != old and mode(out / "node.key") == 0o600


def test_rotation_bundle_order_signer_and_retire_rules(ca_dir, key, tmp_path):
    local = LocalCA(ca_dir, clock=lambda: NOW)
    old = ca_dir.roots()[0]
    first = issue_node_credential(ca_dir, "n1", tmp_path / "n1", now=NOW)
    new = ca_dir.rotate_root(now=NOW + 10, activate_after=100)
    # Pending: in the bundle, but the old root still signs.
    assert ca_dir.trust_bundle(NOW + 20).roots == (old.certificate, new.certificate)
    csr = certs.make_csr(key, WEB)
    assert certs.issued_by(local.sign_csr(csr, WEB, now=NOW + 20).certificate, old.certificate)
    with pytest.raises(CAError, match="already in progress"):
        ca_dir.rotate_root(now=NOW + 20)
    with pytest.raises(CAError, match="becomes active"):
        ca_dir.retire_root(now=NOW + 20)
    # Active: new leaves from the new root, which is listed first.
    assert ca_dir.trust_bundle(NOW + 200).roots == (new.certificate, old.certificate)
    assert certs.issued_by(local.sign_csr(csr, WEB, now=NOW + 200).certificate, new.certificate)
    with pytest.raises(CAError, match="may be valid until"):
        ca_dir.retire_root(now=NOW + 200)
    later = NOW + 110 + 86400 + 1
    with pytest.raises(CAError, match=f"node credentials signed by the old root.*n1 serial {first.serial:x}"):
        ca_dir.retire_root(now=later)
    issue_node_credential(ca_dir, "n1", tmp_path / "n1", replace=True, now=later)
    with pytest.raises(CAError, match="revoke the old serials"):
        ca_dir.retire_root(now=later)
    ca_dir.revoke_serial(first.serial)
    assert ca_dir.retire_root(now=later) == ["root-1"]
    assert ca_dir.trust_bundle(later).roots == (new.certificate,)
    assert not (ca_dir.path / "roots" / "root-1.key").exists()
    with pytest.raises(CAError, match="only one root"):
        ca_dir.retire_root(now=later)


def test_rotate_and_retire_commands(live_ca_dir, capsys):
    d = str(live_ca_dir.path)
    cli("rotate-root", "--dir", d)
    assert len(live_ca_dir.trust_bundle(NOW + 1e6).roots) == 2
    with pytest.raises(UserError, match="may be valid until"):
        cli("retire-root", "--dir", d)
    cli("retire-root", "--dir", d, "--force")
    assert [r.name for r in live_ca_dir.roots()] == ["root-2"]
    cli("status", "--dir", d)
    assert "root-2: signing" in capsys.readouterr().out


def test_open_or_init_is_idempotent_and_checks_trust_domain(tmp_path):
    first = CADirectory.open_or_init(tmp_path / "state" / "ca", now=NOW)
    root = first.roots()[0].certificate
    assert CADirectory.open_or_init(tmp_path / "state" / "ca").roots()[0].certificate == root
    with pytest.raises(CAError, match="trust domain is 'cluster.local' but 'x.org'"):
        CADirectory.open_or_init(tmp_path / "state" / "ca", trust_domain="x.org")


def test_the_root_key_is_parsed_once_and_again_when_its_file_changes(ca_dir, key, monkeypatch):
    """Parsing a PEM key is the slow part of signing with OpenSSL 3.0: the CA keeps the parsed
    key while its file is the same, and reads it again when the file is replaced."""
    loads = []
    real = certs.load_key
    monkeypatch.setattr(certs, "load_key", lambda pem: loads.append(pem) or real(pem))
    csr = (x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
           .sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))
    local = LocalCA(ca_dir, clock=lambda: NOW)
    first = local.sign_csr(csr, WEB)
    second = local.sign_csr(csr, WEB)
    assert len(loads) == 1
    root = ca_dir.roots()[0]
    assert certs.issued_by(first.certificate, root.certificate) and certs.issued_by(second.certificate, root.certificate)
    # The same root key written again (a restore, a re-encryption...): a new file, read again.
    key_file = ca_dir.path / "roots" / f"{root.name}.key"
    data = key_file.read_bytes()
    key_file.unlink()
    key_file.write_bytes(data)
    os.utime(key_file, ns=(NOW_NS := int(NOW * 1e9) + 1, NOW_NS))
    local.sign_csr(csr, WEB)
    assert len(loads) == 2
    # A key file that is gone is an error naming it, not the cached key.
    key_file.unlink()
    with pytest.raises(CAError, match="cannot load the root key"):
        local.sign_csr(csr, WEB)
