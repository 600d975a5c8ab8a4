"""Certificate manager: one certificate per local workload identity, renewed
at half-life, retried with backoff, old certificate served until the new one
is in hand; trust bundle and revocation list polled from the CA.

Time comes from an injected ``clock``; ``refresh()`` does whatever is due at
``clock()`` and ``next_due()`` says when to call it again, so tests drive the
manager with a fake clock and a real CA. ``run()`` is the daemon's loop.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Callable, Protocol

from cryptography import x509

from . import certs
from .errors import CAError, ForeignIdentityError, NoCertificate
from .spiffe import SpiffeId
from .trust import IssuedCertificate, RevocationList, TrustBundle

log = logging.getLogger(__name__)

DEFAULT_LIFETIME = 24 * 3600.0
RETRY_INITIAL = 60.0
RETRY_MAX = 600.0
POLL_INTERVAL = 30.0


class CAClient(Protocol):
    """What the manager needs from a CA: ``LocalCA`` and ``HttpsCAClient`` both implement it."""

    async def sign(self, csr_pem: bytes, identity: SpiffeId, lifetime: float) -> IssuedCertificate: ...

    async def trust_bundle(self) -> TrustBundle: ...

    async def revocation_list(self) -> RevocationList: ...


@dataclass(frozen=True, slots=True)
class Health:
    ok: bool
    reason: str = ""

    @property
    def status(self) -> str:
        return "OK" if self.ok else "Degraded"

    def __str__(self) -> str:
        return self.status if self.ok else f"Degraded: {self.reason}"


class WorkloadCertificate:
    """A workload's certificate, its chain and its private key (never printed). Immutable.

    Kept as DER, with the serial and validity read once: a parsed ``x509.Certificate``
    holds its parsed structure in cryptography's Rust heap and, once its extensions are read,
    a Python object for each of them (tracemalloc: ~3.7 KiB per identity for the leaf's and
    its root's; the chain's root was parsed anew for each identity). ``certificate`` and ``chain`` parse on each use (admin views,
    the signing-root check), which no connection does: handshakes read ``chain_pem`` when an
    identity's context is made and ``not_after``/``serial`` at each connection."""

    __slots__ = ("identity", "serial", "not_before", "not_after", "der", "chain_der", "key_pem")

    def __init__(self, identity: SpiffeId, certificate: x509.Certificate,
                 chain: tuple[x509.Certificate, ...], key_pem: bytes) -> None:
        set_ = object.__setattr__
        set_(self, "identity", identity)
        set_(self, "serial", certificate.serial_number)
        set_(self, "not_before", certs.not_before(certificate))
        set_(self, "not_after", certs.not_after(certificate))
        set_(self, "der", certs.cert_to_der(certificate))
        set_(self, "chain_der", tuple(certs.cert_to_der(c) for c in chain))
        set_(self, "key_pem", key_pem)

    def __setattr__(self, name, value):
        raise AttributeError(f"WorkloadCertificate is immutable (cannot set {name})")

    def __eq__(self, other):
        if not isinstance(other, WorkloadCertificate):
            return NotImplemented
        return (self.identity, self.der, self.chain_der, self.key_pem) == \
            (other.identity, other.der, other.chain_der, other.key_pem)

    def __hash__(self):
        return hash((self.identity, self.der))

    def __repr__(self) -> str:
        return f"WorkloadCertificate(identity={self.identity!r}, serial={certs.serial_hex(self.serial)})"

    @property
    def certificate(self) -> x509.Certificate:
        return x509.load_der_x509_certificate(self.der)

    @property
    def chain(self) -> tuple[x509.Certificate, ...]:
        return tuple(x509.load_der_x509_certificate(der) for der in self.chain_der)

    @property
    def renew_at(self) -> float:
        return self.not_before + (self.not_after - self.not_before) / 2

    @property
    def chain_pem(self) -> bytes:
        return b"".join(certs.der_to_pem(der) for der in (self.der, *self.chain_der))


@dataclass(slots=True)
class _Slot:
    identity: SpiffeId
    current: WorkloadCertificate | None = None
    next_attempt: float = 0.0
    failures: int = 0
    last_error: str | None = None
    # (revocation list, signing root) that ``current`` was last checked against and passed:
    # the check (a parse and an ECDSA verification) is done again only when one changed.
    checked: tuple | None = None


def backoff(failures: int, initial: float = RETRY_INITIAL, cap: float = RETRY_MAX) -> float:
    """Delay before retry number ``failures`` (1-based): 60 s, 120 s, 240 s, ... capped."""
    return min(initial * 2 ** max(failures - 1, 0), cap)


class CertificateManager:
    def __init__(self, ca: CAClient, *, trust_domain: str, clock: Callable[[], float] = time.time,
                 lifetime: float = DEFAULT_LIFETIME, retry_initial: float = RETRY_INITIAL,
                 retry_max: float = RETRY_MAX, poll_interval: float = POLL_INTERVAL):
        self._ca = ca
        self.trust_domain = trust_domain
        self._clock = clock
        self.lifetime = lifetime
        self.retry_initial = retry_initial
        self.retry_max = retry_max
        self.poll_interval = poll_interval
        self._slots: dict[SpiffeId, _Slot] = {}
        self._bundle: TrustBundle | None = None
        self._revocations = RevocationList()
        self._next_poll = 0.0
        self._poll_error: str | None = None
        self._wake = asyncio.Event()

    # ---- workloads ------------------------------------------------------------------

    def add_workload(self, identity: SpiffeId) -> None:
        if identity.trust_domain != self.trust_domain or not identity.is_workload:
            raise ForeignIdentityError(f"{identity} is not a workload identity in trust domain "
                                       f"{self.trust_domain}")
        if identity not in self._slots:
            self._slots[identity] = _Slot(identity)
            self._wake.set()

    def remove_workload(self, identity: SpiffeId) -> None:
        self._slots.pop(identity, None)

    @property
    def workloads(self) -> tuple[SpiffeId, ...]:
        return tuple(self._slots)

    # ---- what connections read ------------------------------------------------------

    def certificate(self, identity: SpiffeId) -> WorkloadCertificate:
        """The current certificate of a LOCAL workload; refuses any other identity."""
        slot = self._slots.get(identity)
        if slot is None:
            raise ForeignIdentityError(f"{identity} is not a workload served by this node agent")
        if slot.current is None:
            raise NoCertificate(f"no certificate for {identity} yet"
                                + (f" (last error: {slot.last_error})" if slot.last_error else ""))
        if slot.current.not_after <= self._clock():
            raise NoCertificate(f"the certificate for {identity} expired at {_fmt(slot.current.not_after)}"
                                + (f" and renewal fails: {slot.last_error}" if slot.last_error else ""))
        return slot.current

    def scoped(self, workload: SpiffeId) -> "ScopedCertificateSource":
        if workload not in self._slots:
            raise ForeignIdentityError(f"{workload} is not a workload served by this node agent")
        return ScopedCertificateSource(self, workload)

    @property
    def trust_bundle(self) -> TrustBundle:
        if self._bundle is None:
            raise NoCertificate("no trust bundle yet (the CA has not answered)"
                                + (f": {self._poll_error}" if self._poll_error else ""))
        return self._bundle

    @property
    def revocations(self) -> RevocationList:
        return self._revocations

    def health(self) -> "Health":
        now = self._clock()
        problems = []
        if self._poll_error:
            problems.append(f"cannot fetch trust bundle/revocations: {self._poll_error}")
        for slot in self._slots.values():
            if slot.current is None:
                problems.append(f"{slot.identity}: no certificate"
                                + (f" ({slot.last_error})" if slot.last_error else ""))
            elif slot.current.not_after <= now:
                problems.append(f"{slot.identity}: certificate expired at {_fmt(slot.current.not_after)}")
            elif slot.last_error:
                problems.append(f"{slot.identity}: renewal failing ({slot.last_error}); current "
                                f"certificate valid until {_fmt(slot.current.not_after)}, next try "
                                f"at {_fmt(slot.next_attempt)}")
        return Health(True) if not problems else Health(False, "; ".join(problems))

    def status(self) -> list[dict]:
        """Per workload: certificate and renewal state (for the admin API's cert dump; no keys)."""
        out = []
        for slot in self._slots.values():
            cur = slot.current
            out.append({
                "identity": slot.identity.uri,
                "serial": certs.serial_hex(cur.serial) if cur else None,
                "not_before": cur.not_before if cur else None,
                "not_after": cur.not_after if cur else None,
                "renew_at": cur.renew_at if cur else None,
                "next_attempt": slot.next_attempt,
                "failures": slot.failures,
                "last_error": slot.last_error,
            })
        return out

    # ---- the work -------------------------------------------------------------------

    def next_due(self) -> float:
        return min([self._next_poll, *(s.next_attempt for s in self._slots.values())])

    async def refresh(self) -> None:
        """Do everything due now: poll bundle and revocations, issue or renew certificates."""
        now = self._clock()
        if now >= self._next_poll:
            await self._poll(now)
        renewed = False
        for slot in list(self._slots.values()):
            if now >= slot.next_attempt:
                renewed |= await self._renew(slot, now)
        if renewed and self._poll_error:
            await self._poll(now)  # the CA answers again: catch up at once

    async def _poll(self, now: float) -> None:
        try:
            bundle = await self._ca.trust_bundle()
            revocations = await self._ca.revocation_list()
        except (CAError, OSError) as exc:
            self._poll_error = str(exc)
            log.warning("identity: %s", exc)
            self._next_poll = now + self.poll_interval
            return
        self._poll_error = None
        self._next_poll = now + self.poll_interval
        if self._bundle is None or bundle.version != self._bundle.version:
            log.info("identity: trust bundle %s (%d roots)", bundle.version, len(bundle.roots))
            self._bundle = bundle
        if revocations.version >= self._revocations.version:
            self._revocations = revocations
        for slot in self._slots.values():
            cur = slot.current
            if cur is None:
                continue
            # Replaced now: a certificate that was revoked, or whose root is no longer the
            # signing root (listed first). The CA activates a new root only after agents
            # had time to fetch the bundle (`rotate-root --activate-after`), so peers
            # already trust the new leaf.
            against = (revocations, bundle.roots[0])
            if slot.checked == against:
                continue
            certificate = cur.certificate
            if revocations.revoked_reason(certificate) or not certs.issued_by(certificate, bundle.roots[0]):
                slot.next_attempt = now
            else:
                slot.checked = against

    async def _renew(self, slot: _Slot, now: float) -> bool:
        key = certs.generate_key()
        csr = certs.make_csr(key, slot.identity)
        try:
            issued = await self._ca.sign(csr, slot.identity, self.lifetime)
            self._check_issued(slot.identity, key, issued)
        except (CAError, OSError) as exc:
            slot.failures += 1
            slot.last_error = str(exc)
            slot.next_attempt = now + backoff(slot.failures, self.retry_initial, self.retry_max)
            log.warning("identity: certificate for %s not renewed (%s); retry in %.0f s%s",
                        slot.identity, exc, slot.next_attempt - now,
                        "; the current certificate keeps serving" if slot.current else "")
            return False
        slot.current = WorkloadCertificate(slot.identity, issued.certificate, issued.chain,
                                           certs.key_to_pem(key))
        slot.checked = None
        slot.failures = 0
        slot.last_error = None
        slot.next_attempt = max(slot.current.renew_at, now + 1.0)
        log.info("identity: certificate for %s serial %s valid until %s", slot.identity,
                 certs.serial_hex(slot.current.serial), _fmt(slot.current.not_after))
        return True

    def _check_issued(self, identity: SpiffeId, key, issued: IssuedCertificate) -> None:
        cert = issued.certificate
        try:
            got = certs.spiffe_id_of(cert)
        except certs.CertificateError as exc:
            raise CAError(f"the CA returned an unusable certificate: {exc}") from None
        if got != identity:
            raise CAError(f"the CA returned a certificate for {got}, not {identity}")
        if not certs.public_keys_equal(cert.public_key(), key.public_key()):
            raise CAError("the CA returned a certificate for a different key")

    async def run(self, stop: asyncio.Event, *, max_sleep: float = 60.0) -> None:
        """Refresh until ``stop`` is set (wakes early when a workload is added)."""
        while not stop.is_set():
            self._wake.clear()
            try:
                await self.refresh()
            except Exception:  # a bug must not stop renewals for every workload
                log.exception("identity: certificate refresh failed")
                self._next_poll = self._clock() + self.poll_interval
            delay = min(max(self.next_due() - self._clock(), 0.05), max_sleep)
            waiters = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(self._wake.wait())]
            await asyncio.wait(waiters, timeout=delay, return_when=asyncio.FIRST_COMPLETED)
            for w in waiters:
                w.cancel()


class ScopedCertificateSource:
    """Hands out the certificate of ONE workload only (a second line of defence,
    like ztunnel's ScopedSecretManager): asking for any other identity raises."""

    def __init__(self, manager: CertificateManager, workload: SpiffeId):
        self._manager = manager
        self.workload = workload

    def certificate(self, identity: SpiffeId | None = None) -> WorkloadCertificate:
        if identity is not None and identity != self.workload:
            raise ForeignIdentityError(
                f"refusing to hand out a certificate for {identity} to a connection of {self.workload}")
        return self._manager.certificate(self.workload)


def _fmt(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ts))
