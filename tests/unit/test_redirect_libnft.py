"""redirect.libnft without root: loading, the one-time fallback warning, closing contexts."""
from __future__ import annotations

import logging

import pytest

from redirect import libnft


def test_missing_library_is_reported_once_and_run_says_why(monkeypatch, caplog):
    monkeypatch.setattr(libnft, "SONAME", "libnftables-does-not-exist.so.9")
    monkeypatch.setattr(libnft, "_lib", None)
    monkeypatch.setattr(libnft, "_load_error", None)
    monkeypatch.setattr(libnft, "_warned", False)
    with caplog.at_level(logging.WARNING, logger="redirect.libnft"):
        assert libnft.available() is False
        assert libnft.available() is False
    messages = [r.getMessage() for r in caplog.records if r.name == "redirect.libnft"]
    assert len(messages) == 1
    assert "cannot load libnftables-does-not-exist.so.9" in messages[0]
    assert "using the nft command instead" in messages[0]
    with pytest.raises(libnft.NftLibError, match="install Debian's libnftables1"):
        libnft.run(None, lambda session: None)


def test_library_loads_and_a_dry_context_closes(monkeypatch):
    # nft_ctx_new(1) (NFT_CTX_DEFAULT is 0) opens no netlink socket: no root needed.
    monkeypatch.setattr(libnft, "NFT_CTX_DEFAULT", 1)
    assert libnft.available(), "libnftables.so.1 comes with Debian's nftables package"
    session = libnft.Session(libnft._load(), "")
    session.close()
    session.close()  # idempotent
    assert libnft.drain(5.0)
    with pytest.raises(libnft.NftLibError, match="used after close"):
        session.cmd("list ruleset")
