"""`nodeagent validate` and `apply` warn about fields that load but are not enforced: one
line per file naming file:line, object and field, on stderr; the command still succeeds."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

VS = """\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: x
  namespace: prod
spec:
  hosts: [x]
  http:
  - match:
    - statPrefix: foo
      uri: {prefix: /}
    route:
    - destination: {host: x}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: x
  namespace: prod
spec:
  host: x
  trafficPolicy:
    connectionPool:
      http: {maxConcurrentStreams: 3}
"""
WANT = ("vs.yaml:10: warning: VirtualService prod/x: spec.http[0].match[0].statPrefix: loaded but not enforced by nodeagent; "
        "also DestinationRule prod/x spec.trafficPolicy.connectionPool.http.maxConcurrentStreams (line 24)")


def run(*args, cwd):
    env = dict(os.environ)
    env.pop("NODEAGENT_CONFIG_DIR", None)
    env["PYTHONPATH"] = str(REPO)
    p = subprocess.run([sys.executable, "-m", "nodeagent", *map(str, args)], cwd=cwd, env=env,
                       capture_output=True, text=True, timeout=60)
    assert "Traceback" not in p.stderr, p.stderr
    return p


def test_validate_and_apply_warn_once_per_file(tmp_path):
    (tmp_path / "vs.yaml").write_text(VS)
    p = run("validate", "-f", "vs.yaml", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert p.stderr.splitlines() == [WANT]
    assert p.stdout.strip() == "valid: 2 objects in 1 file"
    p = run("apply", "-f", "vs.yaml", "--config-dir", tmp_path / "cfg", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert p.stderr.splitlines() == [WANT]
    assert p.stdout.splitlines() == ["virtualservice.networking.istio.io/x created",
                                     "destinationrule.networking.istio.io/x created"]
