"""Where the proxy gets its ConfigSnapshot: nodeagent.store's watched directory.

``open_config(dir)`` validates the directory once (a bad config is a
``UserError`` naming file, object and field) and returns a ``ConfigSource``.
``current()`` is read by every request, so a change applies to the next one;
``start_watch(loop)`` runs the store's watch in each worker (a refused change
is logged and the previous snapshot keeps serving).
"""
from __future__ import annotations

import asyncio
import logging

from nodeagent.cli import UserError
from nodeagent.store import ConfigStore
from policy.errors import ConfigError

log = logging.getLogger(__name__)


class ConfigSource:
    __slots__ = ("store",)

    def __init__(self, store: ConfigStore) -> None:
        self.store = store

    def current(self):
        return self.store.snapshot

    def workload(self, namespace: str, name: str):
        for wl in self.store.snapshot.workloads:
            if wl.namespace == namespace and wl.name == name:
                return wl
        return None

    def start_watch(self, loop: asyncio.AbstractEventLoop):
        return loop.create_task(self.store.watch())


def open_config(directory: str, poll_interval: float = 0.5) -> ConfigSource:
    store = ConfigStore(directory, poll_interval=poll_interval, allow_embedded=False)
    try:
        store.load()
    except ConfigError as exc:
        raise UserError(f"configuration in {directory} rejected:\n" + "\n".join(str(e) for e in exc.errors))
    # The load warnings (file:line, object, field), as a reload logs them (store.reload).
    for w in store.last_warnings:
        log.warning("%s", w)
    return ConfigSource(store)
