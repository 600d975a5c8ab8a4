"""What the agent does not load until it is needed: re2 (and libstdc++, ~2.3 MiB) with the
first regex configured, difflib with the first "did you mean" suggestion. Each check runs
in a fresh interpreter, since this process has imported everything already."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from tests.integration.istio_yaml import fqdn, service, virtual_service

ROOT = Path(__file__).resolve().parents[2]

# a service and a VirtualService whose match is a prefix, or a regex (the %s)
CONFIG = service("catalog", [("127.0.0.9", 8080)]) + virtual_service(
    "catalog", fqdn("catalog"), "  - match: [{uri: {%s: /new}}]\n    route: [{destination: {host: %s}}]\n"
    % ("%s", fqdn("catalog")))


def loaded_after(config: str) -> set:
    code = textwrap.dedent(f"""
        import sys
        from policy.loader import load_text
        from policy.snapshot import build_snapshot
        from policy import routing
        res = load_text({config!r}, "vs.yaml")
        assert res.ok, res.errors
        snap = build_snapshot(res.resources)
        service = snap.resolve_host("catalog.shop.svc.cluster.local", "shop")
        assert service is not None
        routing.route_table(snap, service, 80, "shop")  # the routes compiled, as the proxy does
        print(" ".join(sorted(m for m in ("re2", "difflib") if m in sys.modules)))
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return set(out.stdout.split())


def test_a_config_without_regexes_loads_neither_re2_nor_difflib():
    assert loaded_after(CONFIG % "prefix") == set()


def test_a_regex_match_loads_re2_to_validate_it():
    assert "re2" in loaded_after(CONFIG % "regex")
