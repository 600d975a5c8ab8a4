"""The model contract of docs/internals.md."""
from __future__ import annotations

import dataclasses
import typing

import pytest

from policy import model as m
from policy.duration import DurationError, format_duration, parse_duration
from policy.schema import MESSAGES, check_schema_consistency, snake


def _model_classes():
    return [c for c in vars(m).values() if isinstance(c, type) and dataclasses.is_dataclass(c)
            and c.__module__ == m.__name__]


def test_every_class_is_frozen_with_slots():
    classes = _model_classes()
    assert len(classes) > 50
    for cls in classes:
        assert cls.__dataclass_params__.frozen, cls
        assert "__slots__" in vars(cls), cls


def test_schema_maps_onto_the_dataclasses():
    assert check_schema_consistency() == []
    covered = {msg.cls for msg in MESSAGES.values()}
    missing = [c.__name__ for c in _model_classes() if c not in covered
               and c.__name__ not in ("StringMatch", "SourceRef", "Resource")]
    assert missing == []


def test_field_naming_rule():
    assert snake("consecutive5xxErrors") == "consecutive5xx_errors"   # hence the explicit py name
    assert MESSAGES["OutlierDetection"].fields["consecutive5xxErrors"].py == "consecutive_5xx_errors"
    assert snake("from") == "from_"
    assert snake("http1MaxPendingRequests") == "http1_max_pending_requests"
    assert snake("useSourceIp") == "use_source_ip"


def test_contract_fields_exist():
    # the field lists written in docs/internals.md
    contract = {
        m.VirtualService: "hosts gateways http tcp tls export_to",
        m.HTTPRoute: "name match route redirect rewrite timeout retries fault mirror mirror_percentage mirrors "
                     "headers cors_policy",
        m.HTTPMatchRequest: "name uri scheme method authority headers query_params without_headers ignore_uri_case "
                            "port source_labels source_namespace gateways",
        m.StringMatch: "kind value",
        m.HTTPRouteDestination: "destination weight headers",
        m.Destination: "host subset port",
        m.Headers: "request response",
        m.HeaderOperations: "set add remove",
        m.HTTPRetry: "attempts per_try_timeout retry_on retry_remote_localities",
        m.HTTPFaultInjection: "delay abort",
        m.Delay: "fixed_delay percentage",
        m.Abort: "http_status grpc_status percentage",
        m.HTTPRewrite: "uri authority uri_regex_rewrite",
        m.HTTPRedirect: "uri authority port scheme redirect_code",
        m.DestinationRule: "host traffic_policy subsets export_to workload_selector",
        m.TrafficPolicy: "load_balancer connection_pool outlier_detection tls port_level_settings",
        m.LoadBalancerSettings: "simple consistent_hash",
        m.ConsistentHashLB: "http_header_name http_cookie use_source_ip http_query_parameter_name minimum_ring_size",
        m.ConnectionPoolSettings: "tcp http",
        m.OutlierDetection: "consecutive_5xx_errors consecutive_gateway_errors consecutive_errors interval "
                            "base_ejection_time max_ejection_percent min_health_percent",
        m.ClientTLSSettings: "mode",
        m.Subset: "name labels traffic_policy",
        m.ServiceEntry: "hosts addresses ports location resolution endpoints workload_selector export_to "
                        "subject_alt_names",
        m.ServicePort: "number protocol name target_port",
        m.WorkloadEntry: "address ports labels network locality weight service_account",
        m.AuthorizationPolicy: "selector action provider rules",
        m.Rule: "from_ to when",
        m.RuleFrom: "source",
        m.RuleTo: "operation",
        m.Source: "principals not_principals request_principals not_request_principals namespaces not_namespaces "
                  "ip_blocks not_ip_blocks remote_ip_blocks not_remote_ip_blocks",
        m.Operation: "hosts not_hosts ports not_ports methods not_methods paths not_paths",
        m.Condition: "key values not_values",
        m.PeerAuthentication: "selector mtls port_level_mtls",
        m.Resource: "kind api_version name namespace labels annotations spec source",
        m.SourceRef: "file line",
    }
    for cls, names in contract.items():
        have = {f.name for f in dataclasses.fields(cls)}
        assert set(names.split()) <= have, (cls.__name__, set(names.split()) - have)


def test_defaults_are_empty_tuples_maps_and_none():
    r = m.HTTPRoute()
    assert r.match == () and r.route == () and r.timeout is None and r.retries is None
    mt = m.HTTPMatchRequest()
    assert isinstance(mt.headers, typing.Mapping) and len(mt.headers) == 0
    with pytest.raises(TypeError):
        mt.headers["x"] = m.StringMatch("exact", "y")   # read-only
    assert m.frozen_map({}) is m.EMPTY_MAP


def test_resource_key_and_ref():
    r = m.Resource("VirtualService", "networking.istio.io/v1", "reviews", "shop", m.EMPTY_MAP, m.EMPTY_MAP,
                   m.VirtualService(hosts=("reviews",)), m.SourceRef("shop.yaml", 3), raw={"a": 1})
    assert r.key == ("VirtualService", "shop", "reviews")
    assert r.ref == "VirtualService shop/reviews"
    same = dataclasses.replace(r, raw={"b": 2})
    assert same == r, "raw is not part of equality"
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.name = "x"


def test_spec_kinds_table():
    assert {k: v[1] for k, v in m.SPEC_KINDS.items()} == {
        "VirtualService": ("v1", "v1beta1", "v1alpha3"), "DestinationRule": ("v1", "v1beta1", "v1alpha3"),
        "ServiceEntry": ("v1", "v1beta1", "v1alpha3"), "WorkloadEntry": ("v1", "v1beta1", "v1alpha3"),
        "AuthorizationPolicy": ("v1", "v1beta1"), "PeerAuthentication": ("v1", "v1beta1")}


@pytest.mark.parametrize("text,seconds", [
    ("1.5s", 1.5), ("10ms", 0.01), ("1h", 3600.0), ("1h30m", 5400.0), ("0", 0.0), ("5m", 300.0),
    ("300us", 0.0003), ("250µs", 0.00025), ("100ns", 1e-7), (".5s", 0.5), ("0.5s", 0.5),
])
def test_durations(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text,fragment", [
    ("10", "missing unit"), ("-1s", "must not be negative"), ("1x", "invalid duration"), ("", "empty"),
    ("s", "invalid duration"), ("1.5", "missing unit"), ("1 s", "invalid duration"), ("1s2", "invalid duration"),
])
def test_bad_durations(text, fragment):
    with pytest.raises(DurationError) as ei:
        parse_duration(text)
    assert fragment in str(ei.value)


def test_negative_duration_when_allowed_and_formatting():
    assert parse_duration("-1.5s", allow_negative=True) == -1.5
    assert [format_duration(v) for v in (0, 0.5, 1.5, 300, 7200, 0.0005)] == ["0s", "500ms", "1.5s", "5m", "2h", "0.0005s"]
