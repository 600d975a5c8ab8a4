"""The deploy/ artifacts are what docs/operations.md says they are."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import yaml

from tests.conftest import require

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def test_daemonset_and_rbac():
    docs = [d for d in yaml.safe_load_all((DEPLOY / "kubernetes" / "daemonset.yaml").read_text()) if d]
    ds = next(d for d in docs if d["kind"] == "DaemonSet")
    pod = ds["spec"]["template"]["spec"]
    assert pod["hostNetwork"] is True and pod["hostPID"] is True
    (container,) = pod["containers"]
    assert container["securityContext"]["privileged"] is True
    assert container["command"] == ["nodeagent", "run"]
    assert container["readinessProbe"]["httpGet"] == {"path": "/healthz/ready", "port": 15021}
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert {"/var/run/netns", "/sys/fs/bpf", "/sys/fs/cgroup", "/var/lib/nodeagent", "/etc/nodeagent/config"} <= mounts
    hostpaths = {v["hostPath"]["path"] for v in pod["volumes"] if "hostPath" in v}
    assert {"/var/run/netns", "/sys/fs/bpf", "/sys/fs/cgroup", "/var/lib/nodeagent"} <= hostpaths
    assert any(v.get("configMap", {}).get("name") == "nodeagent-config" for v in pod["volumes"])
    assert any(d["kind"] == "ConfigMap" and d["metadata"]["name"] == "nodeagent-config" for d in docs)

    rbac = [d for d in yaml.safe_load_all((DEPLOY / "kubernetes" / "rbac.yaml").read_text()) if d]
    role = next(d for d in rbac if d["kind"] == "ClusterRole")
    granted = {(g, r) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]}
    assert {("", "pods"), ("", "services"), ("discovery.k8s.io", "endpointslices"),
            ("networking.istio.io", "virtualservices"), ("security.istio.io", "authorizationpolicies")} <= granted
    assert all(set(rule["verbs"]) == {"get", "list", "watch"} for rule in role["rules"])  # read-only
    assert pod["serviceAccountName"] == next(d for d in rbac if d["kind"] == "ServiceAccount")["metadata"]["name"]


def test_cni_conflist_chains_the_plugin():
    conf = json.loads((DEPLOY / "cni" / "10-nodeagent.conflist").read_text())
    types = [p["type"] for p in conf["plugins"]]
    assert types[-1] == "nodeagent-cni" and len(types) >= 2  # chained after the main plugin
    assert (DEPLOY / "cni" / "nodeagent-cni").stat().st_mode & 0o111


def test_systemd_unit_verifies(tmp_path):
    text = (DEPLOY / "systemd" / "nodeagent.service").read_text()
    assert "Type=notify" in text and "Restart=always" in text
    analyze = shutil.which("systemd-analyze")
    require(analyze is not None, "needs systemd-analyze")
    unit = tmp_path / "nodeagent.service"
    unit.write_text(text.replace("/usr/local/bin/nodeagent", shutil.which("true") or "/bin/true"))
    proc = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0 and "nodeagent.service" not in proc.stderr, proc.stderr
