"""The pure pieces of nodeagent.proxy.h2: status mappings, grpc-timeout, protocol selection."""
from __future__ import annotations

import pytest

from nodeagent.proxy.h2 import GRPC_CODES, grpc_timeout, http_to_grpc, is_h2_port
from nodeagent.telemetry import Telemetry, status_labels
from policy.model import ServicePort


@pytest.mark.parametrize("status, code", [
    (400, 13), (401, 16), (403, 7), (404, 12), (429, 14), (502, 14), (503, 14), (504, 14),
    (408, 2), (431, 2), (500, 2), (200, 2),
])
def test_http_status_maps_to_grpc_as_envoy_does(status, code):
    assert http_to_grpc(status) == code


def test_grpc_code_names_are_the_ones_istio_validates():
    from policy.validate import _GRPC_STATUS
    assert set(GRPC_CODES) == _GRPC_STATUS
    assert GRPC_CODES["UNAVAILABLE"] == 14 and GRPC_CODES["OK"] == 0 and GRPC_CODES["UNAUTHENTICATED"] == 16


@pytest.mark.parametrize("value, seconds", [
    ("1H", 3600.0), ("2M", 120.0), ("3S", 3.0), ("250m", 0.25), ("100u", 1e-4), ("5n", 5e-9),
    ("99999999S", 99999999.0),
])
def test_grpc_timeout_values(value, seconds):
    assert grpc_timeout(value) == pytest.approx(seconds)


@pytest.mark.parametrize("value", [None, "", "S", "10", "10x", "-1S", "1.5S", "123456789S", "1 S"])
def test_malformed_grpc_timeout_is_ignored(value):
    assert grpc_timeout(value) is None


@pytest.mark.parametrize("name, protocol, h2", [
    ("grpc", "GRPC", True), ("grpc-api", None, True), ("http2", None, True), ("http2-x", "TCP", True),
    ("web", "HTTP2", True), ("web", "GRPC-WEB", True), ("web", "grpc", True),
    ("http", "HTTP", False), ("http-web", None, False), ("tcp", "TCP", False), (None, None, False),
])
def test_upstream_protocol_follows_istio_protocol_selection(name, protocol, h2):
    assert is_h2_port(ServicePort(number=80, protocol=protocol, name=name)) is h2
    assert is_h2_port(None) is False


def test_grpc_status_becomes_its_own_label_and_plain_statuses_are_unchanged():
    assert status_labels(200) == ("200", "")
    assert status_labels((200, "14")) == ("200", "14")

    class Ctx:
        source = None
        reporter = "source"

    t = Telemetry()
    dest = ("d",) * 8 + ("grpc",)
    t.record_http(Ctx(), dest, (200, "0"), "-", 1.0, 5, 7)
    t.record_http(Ctx(), dest, (200, "0"), "-", 1.0, 5, 7)
    t.record_http(Ctx(), dest, (503, "14"), "UH", 1.0, 0, 0)
    t.record_http(Ctx(), dest[:-1] + ("http",), 200, "-", 1.0, 0, 0)
    keys = {k[-4:]: v[0] for k, v in t.export()["http"].items()}
    assert keys == {("200", "0", "-", "unknown"): 2, ("503", "14", "UH", "unknown"): 1,
                    ("200", "", "-", "unknown"): 1}
