"""Real TCP/TLS backends on 127.0.0.0/8 for the L4 routing tests.

A ``Backend`` answers every connection with ``NAME|tls|<bytes read>`` or
``NAME|plain|<bytes read>``: when it has a TLS context and the client's first
bytes are a handshake record holding a ClientHello, it terminates TLS (with its own
certificate, so the client can verify who answered); otherwise it answers in
plaintext. It reads one chunk, answers, and closes. Threads, blocking sockets,
everything bounded by timeouts.
"""
from __future__ import annotations

import datetime
import ipaddress
import socket
import ssl
import threading
import time
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def self_signed(directory: Path, names: list[str]) -> tuple[Path, Path]:
    """A self-signed ECDSA certificate for ``names`` (DNS SANs; IP literals become IP SANs)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    sans = []
    for n in names:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            sans.append(x509.DNSName(n))
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path = directory / f"{names[0].replace('*', 'star')}.crt"
    key_path = directory / f"{names[0].replace('*', 'star')}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


class Backend:
    def __init__(self, name: str, host: str = "127.0.0.1", tls: tuple[Path, Path] | None = None) -> None:
        self.name = name
        self.host = host
        self.port = 0
        self.context = None
        if tls is not None:
            self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self.context.load_cert_chain(*tls)
        self.connections = 0
        self.seen: list[tuple[str, bytes, float]] = []  # (mode, first bytes, time accepted)
        self._sock = None
        self._stop = threading.Event()
        self._thread = None
        self._lock = threading.Lock()

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    def start(self) -> "Backend":
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, 0))
        sock.listen(256)
        sock.settimeout(0.2)
        self._sock = sock
        self.port = sock.getsockname()[1]
        self._thread = threading.Thread(target=self._accept, name=f"backend-{self.name}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        if self._sock is not None:
            self._sock.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except (socket.timeout, OSError):
                continue
            with self._lock:
                self.connections += 1
            threading.Thread(target=self._serve, args=(conn, time.monotonic()), daemon=True).start()

    def _serve(self, conn: socket.socket, accepted: float) -> None:
        conn.settimeout(5)
        try:
            first = conn.recv(6, socket.MSG_PEEK)
            deadline = time.monotonic() + 0.3
            while first[:1] == b"\x16" and self.context is not None and len(first) < 6 \
                    and time.monotonic() < deadline:
                time.sleep(0.01)
                first = conn.recv(6, socket.MSG_PEEK)
            mode = "plain"
            if first[:1] == b"\x16" and first[5:6] == b"\x01" and self.context is not None:
                conn = self.context.wrap_socket(conn, server_side=True)
                mode = "tls"
            data = conn.recv(65536)
            with self._lock:
                self.seen.append((mode, data, accepted))
            conn.sendall(b"%s|%s|%s" % (self.name.encode(), mode.encode(), data))
        except (OSError, ssl.SSLError):
            pass
        finally:
            try:
                conn.close()
            except OSError:
                pass


def plain_call(port: int, payload: bytes = b"ping", host: str = "127.0.0.1", timeout: float = 5.0) -> bytes:
    """Connect, send, read the answer until the backend closes."""
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.sendall(payload)
        return _read_all(s)


def tls_call(port: int, sni: str | None, cafile: Path | None, payload: bytes = b"ping",
             timeout: float = 5.0) -> bytes:
    """A real TLS client through the proxy: SNI ``sni`` (None: no SNI), and when ``cafile``
    is given the server certificate is verified for that name."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if cafile is None:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    else:
        ctx.load_verify_locations(cafile)
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as raw:
        with ctx.wrap_socket(raw, server_hostname=sni) as s:
            s.sendall(payload)
            return _read_all(s)


def _read_all(s) -> bytes:
    out = b""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            part = s.recv(65536)
        except (ssl.SSLError, ConnectionResetError):
            break
        if not part:
            break
        out += part
    return out
