"""`nodeagent validate|apply|create|get|delete` as a user runs them (subprocess, real files)."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "tests" / "data" / "config"
SHOP = REPO / "examples" / "shop"


def run(*args, cwd=DATA, env_dir=None, stdin=None):
    env = dict(os.environ)
    env.pop("NODEAGENT_CONFIG_DIR", None)
    if env_dir is not None:
        env["NODEAGENT_CONFIG_DIR"] = str(env_dir)
    p = subprocess.run([sys.executable, "-m", "nodeagent", *map(str, args)], cwd=cwd, env=env,
                       input=stdin, capture_output=True, text=True, timeout=60)
    assert "Traceback" not in p.stderr, p.stderr
    return p


class Result:
    def __init__(self, returncode: int, stdout: str, stderr: str):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


@pytest.fixture
def call(capsys, monkeypatch):
    """The same CLI in-process (fast): ``nodeagent.cli.main(argv)`` with real files."""
    from nodeagent.cli import main

    def invoke(*args, env_dir=None, stdin=None):
        monkeypatch.chdir(DATA)
        if env_dir is None:
            monkeypatch.delenv("NODEAGENT_CONFIG_DIR", raising=False)
        else:
            monkeypatch.setenv("NODEAGENT_CONFIG_DIR", str(env_dir))
        # a real text layer over bytes: the CLI reads sys.stdin.buffer
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO((stdin or "").encode("utf-8")), "utf-8"))
        capsys.readouterr()
        rc = main([str(a) for a in args])
        out, err = capsys.readouterr()
        assert "Traceback" not in err, err
        return Result(rc, out, err)
    return invoke


def test_validate_valid_directory():
    p = run("validate", "-f", SHOP)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "valid: 24 objects in 3 files"
    assert p.stderr == ""


def test_validate_warns_on_unenforced_kinds_but_succeeds():
    p = run("validate", "-f", "valid-with-gateway.yaml")
    assert p.returncode == 0
    assert p.stdout.strip() == "valid: 1 objects in 1 file, 2 ignored"
    (line,) = p.stderr.splitlines()
    assert line.startswith("valid-with-gateway.yaml:1: warning: loaded but not enforced by nodeagent (ignored): "
                           "Gateway shop/shop-gateway")
    assert "Service shop/reviews (v1, line 12)" in line


def test_validate_reports_every_error_with_file_line_object_path():
    p = run("validate", "-f", "bad-weight.yaml")
    assert p.returncode == 1
    assert p.stderr.splitlines() == [
        "bad-weight.yaml:19: VirtualService shop/reviews: spec.http[0].route[1].weight: must be >= 0, got -5",
        'bad-weight.yaml:20: VirtualService shop/reviews: spec.http[0].timeout: must be a duration with a unit '
        'such as "10s" or "10ms", got 10',
        "nodeagent: configuration is invalid: 2 errors",
    ]
    assert p.stdout == ""


@pytest.mark.parametrize("name,expected", [
    ("malformed.yaml", "malformed.yaml:8: invalid YAML:"),
    ("list-document.yaml", "list-document.yaml:1: document 1 must be a Kubernetes object"),
    ("scalar-document.yaml", "scalar-document.yaml:1: document 1 must be a Kubernetes object"),
    ("duplicate.yaml", "duplicate.yaml:12: DestinationRule shop/reviews: metadata.name: duplicate object"),
    ("missing.yaml", "missing.yaml: no such file or directory"),
])
def test_validate_clear_errors(name, expected):
    p = run("validate", "-f", name)
    assert p.returncode == 1
    assert p.stderr.splitlines()[0].startswith(expected), p.stderr
    assert p.stderr.splitlines()[-1].startswith("nodeagent: configuration is invalid")


def test_validate_empty_file():
    p = run("validate", "-f", "empty.yaml")
    assert p.returncode == 1
    assert p.stderr.splitlines() == ["empty.yaml: warning: no objects in this file (it is empty)",
                                     "nodeagent: no objects found to validate"]
    # an empty file next to valid ones is only a warning
    p = run("validate", "-f", "empty.yaml", "-f", SHOP / "security.yaml")
    assert p.returncode == 0 and "no objects in this file" in p.stderr


def test_validate_several_files_and_stdin():
    p = run("validate", "-f", "-", "-f", SHOP / "catalog.yaml", stdin=(SHOP / "security.yaml").read_text())
    assert p.returncode == 0 and p.stdout.strip() == "valid: 10 objects in 2 files"
    p = run("validate", "-f", "-", "-f", SHOP / "security.yaml", stdin=(SHOP / "security.yaml").read_text())
    assert p.returncode == 1 and "duplicate object" in p.stderr


def test_round_trip_apply_create_get_delete(tmp_path, call):
    conf = tmp_path / "config.d"
    p = call("apply", "-f", SHOP / "catalog.yaml", "--config-dir", conf)
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines() == [
        "serviceentry.networking.istio.io/catalog created",
        "workloadentry.networking.istio.io/catalog-v1a created",
        "workloadentry.networking.istio.io/catalog-v1b created",
        "workloadentry.networking.istio.io/catalog-v2 created",
        "virtualservice.networking.istio.io/catalog created",
        "destinationrule.networking.istio.io/catalog created",
    ]
    assert (conf / "virtualservice.shop.catalog.yaml").is_file()

    # the environment variable names the directory too
    p = call("apply", "-f", SHOP, env_dir=conf)
    assert p.returncode == 0
    assert "virtualservice.networking.istio.io/catalog unchanged" in p.stdout
    assert "virtualservice.networking.istio.io/reviews created" in p.stdout
    assert "peerauthentication.security.istio.io/default created" in p.stdout

    p = call("create", "-f", SHOP / "security.yaml", "--config-dir", conf)
    assert p.returncode == 1
    assert 'peerauthentications.security.istio.io "default" already exists in namespace shop' in p.stderr

    p = call("get", "vs", "-n", "shop", "--config-dir", conf)
    assert p.returncode == 0
    assert p.stdout.splitlines()[0].split() == ["NAME", "GATEWAYS", "HOSTS"]
    assert [ln.split()[0] for ln in p.stdout.splitlines()[1:]] == ["catalog", "productpage", "ratings", "reviews"]
    p = call("get", "VirtualServices", "--config-dir", conf)
    assert p.returncode == 0 and "No resources found in default namespace." in p.stderr

    p = call("get", "dr", "catalog", "-n", "shop", "-o", "yaml", "--config-dir", conf)
    assert p.returncode == 0
    got = yaml.safe_load(p.stdout)
    src = [d for d in yaml.safe_load_all((SHOP / "catalog.yaml").read_text()) if d["kind"] == "DestinationRule"][0]
    assert got == src
    p = call("get", "se", "-A", "-o", "json", "--config-dir", conf)
    items = json.loads(p.stdout)["items"]
    assert sorted(i["metadata"]["name"] for i in items) == ["catalog", "productpage", "ratings", "reviews"]
    p = call("get", "workloadentry", "-n", "shop", "-o", "name", "--config-dir", conf)
    assert "workloadentry.networking.istio.io/catalog-v1a" in p.stdout.splitlines()
    for alias in ("ap", "authorizationpolicies", "AuthorizationPolicy", "authorizationpolicies.security.istio.io"):
        p = call("get", alias, "-n", "shop", "--config-dir", conf)
        assert p.returncode == 0 and "reviews-from-productpage" in p.stdout, alias

    p = call("delete", "vs", "reviews", "-n", "shop", "--config-dir", conf)
    assert p.returncode == 0 and p.stdout.strip() == "virtualservice.networking.istio.io/reviews deleted"
    p = call("get", "vs", "reviews", "-n", "shop", "--config-dir", conf)
    assert p.returncode == 1 and 'virtualservices.networking.istio.io "reviews" not found' in p.stderr
    p = call("delete", "vs", "reviews", "-n", "shop", "--config-dir", conf)
    assert p.returncode == 1 and "not found" in p.stderr
    assert call("delete", "vs", "reviews", "-n", "shop", "--ignore-not-found", "--config-dir", conf).returncode == 0

    p = call("delete", "-f", SHOP / "security.yaml", "--config-dir", conf)
    assert p.returncode == 0 and len(p.stdout.splitlines()) == 4
    p = call("get", "pa", "-A", "--config-dir", conf)
    assert p.returncode == 0 and "No resources found" in p.stderr
    p = call("validate", "-f", conf)
    assert p.returncode == 0 and p.stdout.strip() == "valid: 19 objects in 19 files"


def test_apply_of_invalid_input_changes_nothing(tmp_path, call):
    conf = tmp_path / "c"
    call("apply", "-f", SHOP / "security.yaml", "--config-dir", conf)
    before = sorted(p.name for p in conf.iterdir())
    p = call("apply", "-f", SHOP / "catalog.yaml", "-f", "bad-weight.yaml", "--config-dir", conf)
    assert p.returncode == 1
    assert "bad-weight.yaml:19: VirtualService shop/reviews: spec.http[0].route[1].weight" in p.stderr
    assert p.stderr.splitlines()[-1] == "nodeagent: 2 errors: nothing was applied"
    assert sorted(p.name for p in conf.iterdir()) == before
    p = call("apply", "-f", "empty.yaml", "--config-dir", conf)
    assert p.returncode == 1 and "no objects passed to apply" in p.stderr


def test_apply_namespace_flag(tmp_path, call):
    conf = tmp_path / "c"
    p = call("apply", "-f", SHOP / "security.yaml", "-n", "prod", "--config-dir", conf)
    assert p.returncode == 1 and 'does not match the namespace "prod"' in p.stderr
    obj = "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: db}\nspec: {host: db}\n"
    p = call("apply", "-f", "-", "-n", "prod", "--config-dir", conf, stdin=obj)
    assert p.returncode == 0 and (conf / "destinationrule.prod.db.yaml").exists()
    p = call("get", "dr", "-n", "prod", "--config-dir", conf)
    assert p.stdout.splitlines()[1].split()[:2] == ["db", "db"]


def test_usage_errors(tmp_path, call):
    p = call("get", "gateways", "--config-dir", tmp_path)
    assert p.returncode == 1 and 'doesn\'t have a resource type "gateways"' in p.stderr
    p = call("delete", "--config-dir", tmp_path)
    assert p.returncode == 1 and "delete needs -f PATH or KIND NAME" in p.stderr
    p = call("get", "vs", "--config-dir", tmp_path / "nope")
    assert p.returncode == 1 and "does not exist" in p.stderr


def test_validate_istio_samples_directory(samples_dir):
    p = run("validate", "-f", samples_dir / "more")
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("valid: ") and "ignored" in p.stdout          # the Sidecar
    assert "error" not in p.stderr.lower()
    assert "Sidecar seexamples/default" in p.stderr                         # one warning for it
    p = run("validate", "-f", samples_dir / "bookinfo-networking" / "virtual-service-reviews-80-20.yaml",
            "-f", samples_dir / "bookinfo-networking" / "destination-rule-all.yaml")
    assert p.returncode == 0 and p.stderr == ""



def test_apply_get_delete_as_a_subprocess(tmp_path):
    conf = tmp_path / "c"
    p = run("apply", "-f", SHOP / "security.yaml", "--config-dir", conf)
    assert p.returncode == 0 and "authorizationpolicy.security.istio.io/ratings-from-reviews created" in p.stdout
    p = run("get", "ap", "-n", "shop", "-o", "name", env_dir=conf)
    assert p.stdout.splitlines() == ["authorizationpolicy.security.istio.io/catalog-no-delete",
                                     "authorizationpolicy.security.istio.io/ratings-from-reviews",
                                     "authorizationpolicy.security.istio.io/reviews-from-productpage"]
    p = run("delete", "ap", "catalog-no-delete", "-n", "shop", "--config-dir", conf)
    assert p.returncode == 0 and p.stdout.strip() == "authorizationpolicy.security.istio.io/catalog-no-delete deleted"
