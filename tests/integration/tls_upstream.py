"""Real TLS upstreams for the TLS origination tests: a test CA and certificates made with
``cryptography`` in a temporary directory, and a threaded server on 127.0.0.0/8 that records
what reached it (SNI, client certificate, requests) and any byte sent in plaintext."""
from __future__ import annotations

import datetime
import ipaddress
import socket
import ssl
import threading
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


class TestCA:
    """A CA whose certificate and issued leaves are written as PEM files under ``directory``."""

    __test__ = False

    def __init__(self, directory: Path, name: str) -> None:
        self.dir = directory
        self.name = name
        self.key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} test CA")])
        now = datetime.datetime.now(datetime.timezone.utc)
        self.cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
                     .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
                     .not_valid_before(now - datetime.timedelta(hours=1))
                     .not_valid_after(now + datetime.timedelta(days=2))
                     .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                     .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                                  content_commitment=False, key_encipherment=False,
                                                  data_encipherment=False, key_agreement=False,
                                                  encipher_only=False, decipher_only=False), critical=True)
                     .sign(self.key, hashes.SHA256()))
        self.cert_file = directory / f"{name}-ca.pem"
        self.cert_file.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def issue(self, name: str, dns=(), ips=(), *, client: bool = False) -> tuple[Path, Path]:
        """(certificate file, key file) of a leaf with these SANs."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        sans = [x509.DNSName(d) for d in dns] + [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
                   .issuer_name(self.cert.subject).public_key(key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(hours=1))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH if client
                                                         else ExtendedKeyUsageOID.SERVER_AUTH]), critical=False))
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        cert_file, key_file = self.dir / f"{name}.pem", self.dir / f"{name}-key.pem"
        cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        return cert_file, key_file


    def crl(self, revoked=(), name: str = "") -> Path:
        """A PEM CRL signed by this CA revoking the leaves in the certificate files ``revoked``."""
        now = datetime.datetime.now(datetime.timezone.utc)
        builder = (x509.CertificateRevocationListBuilder().issuer_name(self.cert.subject)
                   .last_update(now - datetime.timedelta(hours=1)).next_update(now + datetime.timedelta(days=1)))
        for path in revoked:
            leaf = x509.load_pem_x509_certificate(Path(path).read_bytes())
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(leaf.serial_number)
                .revocation_date(now - datetime.timedelta(minutes=1)).build())
        out = self.dir / f"{self.name}-{name or 'crl'}.pem"
        out.write_bytes(builder.sign(self.key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))
        return out


class TlsUpstream:
    """A TLS server: HTTP/1.1 (answers ``200`` with its name, keep-alive) or an echo server.

    Records per connection: ``snis`` (the ClientHello's server name), ``client_subjects``
    (the CN of a verified client certificate), ``requests`` (request heads received over TLS),
    ``handshake_errors``, ``tls_connections``, and ``plaintext``: the bytes of every
    connection whose first byte was not a TLS handshake record (nothing should ever land there)."""

    def __init__(self, name: str, cert: Path, key: Path, *, host: str = "127.0.0.1",
                 client_ca: Path | None = None, echo: bool = False) -> None:
        self.name = name
        self.host = host
        self.echo = echo
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(cert, key)
        if client_ca is not None:
            self.ctx.verify_mode = ssl.CERT_REQUIRED
            self.ctx.load_verify_locations(client_ca)
        self.ctx.sni_callback = self._sni
        self.snis: list[str | None] = []
        self.client_subjects: list[str] = []
        self.requests: list[bytes] = []
        self.handshake_errors: list[str] = []
        self.plaintext: list[bytes] = []
        self.tls_connections = 0
        self.lock = threading.Lock()
        self.sock = None
        self.port = 0
        self._stop = False
        self._conns: list[socket.socket] = []

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    def _sni(self, sslobj, server_name, ctx) -> None:
        with self.lock:
            self.snis.append(server_name)

    def start(self) -> "TlsUpstream":
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((self.host, 0))
        self.sock.listen(64)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def stop(self) -> None:
        self._stop = True
        self.sock.close()
        for c in list(self._conns):
            try:
                c.close()
            except OSError:
                pass

    def reset(self) -> None:
        with self.lock:
            for lst in (self.snis, self.client_subjects, self.requests, self.handshake_errors, self.plaintext):
                lst.clear()
            self.tls_connections = 0

    def _accept(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            self._conns.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(10)
        try:
            first = conn.recv(1, socket.MSG_PEEK)
            if not first:
                return
            if first[0] != 0x16:  # not a TLS handshake record: plaintext reached us
                data = b""
                conn.settimeout(0.5)
                try:
                    while len(data) < 65536:
                        chunk = conn.recv(4096)
                        if not chunk:
                            break
                        data += chunk
                except OSError:
                    pass
                with self.lock:
                    self.plaintext.append(data)
                return
            try:
                tls = self.ctx.wrap_socket(conn, server_side=True)
            except (ssl.SSLError, OSError) as exc:
                with self.lock:
                    self.handshake_errors.append(str(exc))
                return
            with self.lock:
                self.tls_connections += 1
                cert = tls.getpeercert()
                if cert:
                    cn = [v for rdn in cert["subject"] for k, v in rdn if k == "commonName"]
                    self.client_subjects.append(cn[0] if cn else "?")
            if self.echo:
                self._echo(tls)
            else:
                self._http(tls)
        except OSError:
            pass
        finally:
            try:
                conn.close()
            except OSError:
                pass

    def _echo(self, tls) -> None:
        while True:
            data = tls.recv(65536)
            if not data:
                return
            with self.lock:
                self.requests.append(data)
            tls.sendall(data.upper())

    def _http(self, tls) -> None:
        buf = b""
        while True:
            while b"\r\n\r\n" not in buf:
                chunk = tls.recv(65536)
                if not chunk:
                    return
                buf += chunk
            head, buf = buf.split(b"\r\n\r\n", 1)
            with self.lock:
                self.requests.append(head)
            body = self.name.encode()
            tls.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: %d\r\n\r\n%s"
                        % (len(body), body))
