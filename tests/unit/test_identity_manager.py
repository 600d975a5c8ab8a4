"""CertificateManager driven by a fake clock against the real LocalCA (files in
a temporary directory)."""
from __future__ import annotations

import asyncio
import os

import pytest

from nodeagent.identity import certs, create_manager
from nodeagent.identity.ca import CADirectory, LocalCA
from nodeagent.identity.errors import ForeignIdentityError, NoCertificate
from nodeagent.identity.manager import CertificateManager
from nodeagent.identity.spiffe import SpiffeId
from nodeagent.identity.tls import TunnelTls

T0 = 1_800_000_000.0
WEB = SpiffeId.workload("shop", "web")
DB = SpiffeId.workload("shop", "db")


class FakeClock:
    def __init__(self, now: float):
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock():
    return FakeClock(T0)


@pytest.fixture
def ca_dir(tmp_path):
    return CADirectory.init(tmp_path / "ca", now=T0 - 3600)


@pytest.fixture
def manager(ca_dir, clock):
    m = CertificateManager(LocalCA(ca_dir, clock=clock), trust_domain="cluster.local", clock=clock)
    m.add_workload(WEB)
    return m


def refresh(m: CertificateManager) -> None:
    asyncio.run(m.refresh())


def test_issues_then_renews_at_half_life(manager, clock):
    refresh(manager)
    first = manager.certificate(WEB)
    assert first.not_after == T0 + 24 * 3600
    assert first.renew_at == first.not_before + (first.not_after - first.not_before) / 2
    assert manager.next_due() == min(first.renew_at, T0 + manager.poll_interval)
    assert manager.health().ok and manager.health().status == "OK"

    clock.now = first.renew_at - 1
    refresh(manager)
    assert manager.certificate(WEB).serial == first.serial

    clock.now = first.renew_at
    refresh(manager)
    second = manager.certificate(WEB)
    assert second.serial != first.serial
    assert second.key_pem != first.key_pem  # a fresh key every renewal
    assert second.not_after == clock.now + 24 * 3600
    assert "PRIVATE" not in repr(second)


def test_lifetime_is_configurable(ca_dir, clock):
    m = CertificateManager(LocalCA(ca_dir, clock=clock), trust_domain="cluster.local", clock=clock,
                           lifetime=2 * 3600)
    m.add_workload(WEB)
    refresh(m)
    assert m.certificate(WEB).not_after == T0 + 2 * 3600
    assert m.certificate(WEB).renew_at == T0 - 60 + (2 * 3600 + 60) / 2


def test_failed_renewal_backs_off_keeps_old_cert_and_reports_degraded(manager, ca_dir, clock):
    refresh(manager)
    old = manager.certificate(WEB)
    hidden = ca_dir.path.with_name("ca-away")
    os.rename(ca_dir.path, hidden)  # the CA is gone
    try:
        clock.now = old.renew_at
        due = old.renew_at
        for attempt, delay in enumerate((60, 120, 240, 480, 600, 600), start=1):
            refresh(manager)
            assert manager.certificate(WEB).serial == old.serial  # still served
            health = manager.health()
            assert not health.ok and health.status == "Degraded"
            assert "renewal failing" in health.reason and "ca.json is missing" in health.reason
            due += delay
            assert manager.status()[0]["failures"] == attempt
            assert manager.status()[0]["next_attempt"] == due
            clock.now = due - 1
            refresh(manager)  # nothing is due yet: still the same schedule
            assert manager.status()[0]["next_attempt"] == due
            clock.now = due
    finally:
        os.rename(hidden, ca_dir.path)
    refresh(manager)
    assert manager.certificate(WEB).serial != old.serial
    assert manager.health().ok


def test_certificate_expires_while_ca_is_down(manager, ca_dir, clock):
    refresh(manager)
    old = manager.certificate(WEB)
    os.rename(ca_dir.path, ca_dir.path.with_name("ca-away"))
    clock.now = old.not_after
    refresh(manager)
    with pytest.raises(NoCertificate, match="expired at .* and renewal fails"):
        manager.certificate(WEB)
    assert "expired" in manager.health().reason


def test_guard_refuses_foreign_identities(manager):
    refresh(manager)
    manager.add_workload(DB)
    refresh(manager)
    source = manager.scoped(WEB)
    assert source.certificate(WEB).identity == WEB
    assert source.certificate().identity == WEB
    with pytest.raises(ForeignIdentityError, match="refusing to hand out a certificate for "
                                                   "spiffe://cluster.local/ns/shop/sa/db"):
        source.certificate(DB)
    other = SpiffeId.workload("bank", "vault")
    with pytest.raises(ForeignIdentityError, match="not a workload served by this node agent"):
        manager.certificate(other)
    with pytest.raises(ForeignIdentityError):
        manager.scoped(other)
    with pytest.raises(ForeignIdentityError, match="trust domain"):
        manager.add_workload(SpiffeId.workload("shop", "web", "other.org"))
    tls = TunnelTls(manager).scoped(WEB)
    assert tls.client_context() is tls.client_context(WEB)
    with pytest.raises(ForeignIdentityError):
        tls.client_context(DB)
    with pytest.raises(ForeignIdentityError):
        tls.server_context(DB)


def test_new_signing_root_or_revoked_cert_means_immediate_reissue(manager, ca_dir, clock):
    refresh(manager)
    first = manager.certificate(WEB)
    new_root = ca_dir.rotate_root(now=clock.now, activate_after=600)
    clock.now += manager.poll_interval
    refresh(manager)
    assert len(manager.trust_bundle.roots) == 2
    assert manager.certificate(WEB).serial == first.serial  # new root not signing yet: keep it
    clock.now = new_root.active_from
    refresh(manager)
    second = manager.certificate(WEB)
    assert second.serial != first.serial  # moved to the new signing root at once
    assert certs.issued_by(second.certificate, new_root.certificate)
    ca_dir.retire_root(now=clock.now, force=True)
    clock.now += manager.poll_interval
    refresh(manager)
    assert manager.trust_bundle.roots == (new_root.certificate,)
    assert manager.certificate(WEB).serial == second.serial
    ca_dir.revoke_serial(second.serial)
    clock.now += manager.poll_interval
    refresh(manager)
    assert manager.revocations.version == 1
    assert manager.certificate(WEB).serial not in (first.serial, second.serial)


def test_no_certificate_before_first_refresh(manager):
    assert manager.status() == [{"identity": WEB.uri, "serial": None, "not_before": None, "not_after": None,
                                 "renew_at": None, "next_attempt": 0.0, "failures": 0, "last_error": None}]
    with pytest.raises(NoCertificate, match="no certificate for"):
        manager.certificate(WEB)
    with pytest.raises(NoCertificate, match="no trust bundle"):
        manager.trust_bundle
    assert manager.health().reason.startswith("spiffe://cluster.local/ns/shop/sa/web: no certificate")


def test_run_loop_and_local_mode_factory(tmp_path):
    manager = create_manager(state_dir=tmp_path / "state")
    assert oct(os.stat(tmp_path / "state" / "ca").st_mode & 0o777) == "0o700"

    async def scenario():
        stop = asyncio.Event()
        task = asyncio.create_task(manager.run(stop))
        manager.add_workload(WEB)  # wakes the loop
        for _ in range(100):
            await asyncio.sleep(0.02)
            if manager.health().ok and manager.workloads:
                break
        stop.set()
        await asyncio.wait_for(task, 5)

    asyncio.run(scenario())
    assert certs.spiffe_id_of(manager.certificate(WEB).certificate) == WEB
