"""TlsStream hands every decrypted record to the app as its own bytes object: the plaintext
lands in one per-thread buffer that the next record overwrites, so what the app keeps must be
a copy (nodeagent/proxy/tunnel.py ``_copy_out``; compiled, a PyBytes_FromStringAndSize from
the buffer). Real TLS 1.3 on loopback, both event loops."""
from __future__ import annotations

import asyncio
import os

import pytest

from tests.integration.test_tls_stream import LOOPS, App, contexts, pair, until  # noqa: F401 (fixture)

pytestmark = pytest.mark.timeout(30)


class Keeper(App):
    """Keeps the very objects it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.chunks: list = []

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self.chunks.append(data)


@pytest.mark.parametrize("loop_name", sorted(LOOPS))
def test_records_kept_by_the_app_are_not_overwritten_by_later_ones(contexts, loop_name, monkeypatch):  # noqa: F811
    import tests.integration.test_tls_stream as base

    monkeypatch.setattr(base, "App", Keeper)  # pair() makes its apps with this name

    async def scenario():
        server, client, _, listener = await pair(*contexts)
        try:
            assert isinstance(server, Keeper)
            records = [os.urandom(n) for n in (1, 7, 100, 16384, 5, 3000, 2)]
            for record in records:  # one at a time: each arrives as its own read and record
                before = len(server.data)
                client.transport.write(record)
                await until(lambda: len(server.data) == before + len(record))
            want = b"".join(records)
            assert all(type(c) is bytes for c in server.chunks)
            assert b"".join(server.chunks) == want  # earlier objects intact after later reads
        finally:
            client.transport.abort()
            listener.close()

    with asyncio.Runner(loop_factory=LOOPS[loop_name]) as runner:
        runner.run(scenario())
