"""Round trips through the CLI (`get -o yaml|json` -> `apply` -> `delete -f`), and inputs that used
to end in a traceback. Subprocesses where the process boundary matters (stdin bytes, exit codes)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
SHOP = REPO / "examples" / "shop"


def run(*args, stdin: bytes | None = None, cwd=None):
    env = dict(os.environ)
    env.pop("NODEAGENT_CONFIG_DIR", None)
    env["LC_ALL"] = "C"     # an ASCII locale: stdin/stdout text layers are not UTF-8
    env.pop("PYTHONUTF8", None)
    p = subprocess.run([sys.executable, "-m", "nodeagent", *map(str, args)], env=env, input=stdin,
                       capture_output=True, timeout=60, cwd=cwd)
    out, err = p.stdout.decode("utf-8", "replace"), p.stderr.decode("utf-8", "replace")
    return p.returncode, out, err


def files(d: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(d.iterdir())}


@pytest.mark.parametrize("fmt", ["yaml", "json"])
def test_get_output_applies_into_another_directory_and_deletes(tmp_path, fmt):
    src, dst = tmp_path / "d", tmp_path / "e"
    rc, out, err = run("apply", "-f", SHOP, "--config-dir", src)
    assert rc == 0, err
    rc, out, err = run("get", "all", "-A", "-o", fmt, "--config-dir", src)
    assert rc == 0, err
    listing = yaml.safe_load(out) if fmt == "yaml" else json.loads(out)
    assert listing["kind"] == "List" and listing["metadata"] == {"resourceVersion": ""}   # as kubectl writes it
    assert "name" not in listing["metadata"]
    rt = tmp_path / f"rt.{fmt}"
    rt.write_text(out)
    rc, out, err = run("apply", "-f", rt, "--config-dir", dst)
    assert rc == 0 and err == "", err
    assert len(out.splitlines()) == 24 and all(ln.endswith(" created") for ln in out.splitlines())
    assert files(dst) == files(src)
    rc, out, err = run("apply", "-f", rt, "--config-dir", dst)
    assert rc == 0 and all(ln.endswith(" unchanged") for ln in out.splitlines()), out
    # one object, printed on its own, round-trips too
    rc, one, err = run("get", "dr", "reviews", "-n", "shop", "-o", fmt, "--config-dir", src)
    (tmp_path / f"one.{fmt}").write_text(one)
    rc, out, err = run("apply", "-f", tmp_path / f"one.{fmt}", "--config-dir", dst)
    assert rc == 0 and out.strip() == "destinationrule.networking.istio.io/reviews unchanged", err
    # delete -f reads the List's items
    rc, out, err = run("delete", "-f", rt, "--config-dir", dst)
    assert rc == 0, err
    assert len(out.splitlines()) == 24 and all(ln.endswith(" deleted") for ln in out.splitlines())
    assert list(dst.iterdir()) == [] or all(p.name.startswith(".") for p in dst.iterdir())


def test_delete_from_stdin_and_a_list_with_invalid_specs(tmp_path):
    conf = tmp_path / "c"
    assert run("apply", "-f", SHOP / "security.yaml", "--config-dir", conf)[0] == 0
    # identities only: a spec that no longer validates still names the object to delete
    doc = {"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": ""}, "items": [
        {"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
         "metadata": {"name": "default", "namespace": "shop"}, "spec": {"mtls": {"mode": "BOGUS"}}},
        {"apiVersion": "networking.istio.io/v1alpha3", "kind": "Gateway", "metadata": {"name": "g"}}]}
    rc, out, err = run("delete", "-f", "-", "--config-dir", conf, stdin=yaml.safe_dump(doc).encode())
    assert rc == 0, err
    assert out.strip() == "peerauthentication.security.istio.io/default deleted"
    assert "Gateway default/g" in err and "not stored by nodeagent" in err


def test_delete_with_namespace_flag_checks_the_objects_namespace(tmp_path):
    conf = tmp_path / "c"
    assert run("apply", "-f", SHOP / "security.yaml", "--config-dir", conf)[0] == 0
    rc, out, err = run("delete", "-f", SHOP / "security.yaml", "-n", "prod", "--config-dir", conf)
    assert rc == 1 and 'does not match the namespace "prod"' in err and out == ""


def test_undecodable_stdin_is_a_clear_error():
    for cmd in (("validate",), ("apply", "--config-dir", "/nonexistent/never"),
                ("delete", "--config-dir", "/nonexistent/never")):
        rc, out, err = run(*cmd, "-f", "-", stdin=b"\xff\xfe")
        assert "Traceback" not in err, err
        assert rc == 1 and err.splitlines()[0] == "<stdin>:1: not UTF-8 text (is this a YAML file?)", err


def test_stdin_is_read_as_utf8_bytes_whatever_the_locale():
    doc = ("apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata:\n  name: r\n"
           "  annotations: {note: \"caf\u00e9 \u2713\"}\nspec: {host: r}\n")
    rc, out, err = run("validate", "-f", "-", stdin=doc.encode("utf-8"))
    assert rc == 0 and out.strip() == "valid: 1 objects in 1 file", err


def test_deeply_nested_input_is_a_clear_error(tmp_path):
    deep = tmp_path / "deep.yaml"
    deep.write_text("[" * 5000 + "]" * 5000 + "\n")
    for cmd in (("validate",), ("apply", "--config-dir", tmp_path / "c"), ("delete", "--config-dir", tmp_path / "c")):
        rc, out, err = run(*cmd, "-f", deep)
        assert "Traceback" not in err, err
        assert rc == 1 and err.splitlines()[0] == f"{deep}:1: invalid YAML: nested more than 1000 levels deep", err


def test_duplicate_metadata_name_is_reported(tmp_path):
    f = tmp_path / "dup.yaml"
    f.write_text("apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata:\n  name: a\n  name: b\n"
                 "spec: {host: a}\n")
    rc, out, err = run("validate", "-f", f)
    assert rc == 1 and err.splitlines()[0] == f'{f}:5: DestinationRule default/a: metadata.name: duplicate field "name"'


_BUG = """
import sys
import nodeagent.commands.config as c
def boom(args):
    raise KeyError("a bug")
c.cmd_validate = boom
from nodeagent.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_an_internal_error_is_one_line_and_exit_70(tmp_path):
    def bug(*args):
        p = subprocess.run([sys.executable, "-c", _BUG, *args], capture_output=True, text=True, timeout=60,
                           cwd=REPO)
        return p.returncode, p.stderr
    rc, err = bug("validate", "-f", "x.yaml")
    assert rc == 70
    assert err.splitlines() == ["nodeagent: internal error: KeyError: 'a bug' (rerun with -v for the traceback)"]
    rc, err = bug("-v", "validate", "-f", "x.yaml")
    assert rc == 70 and "Traceback (most recent call last)" in err and ", in boom" in err
    assert err.splitlines()[-1] == "nodeagent: internal error: KeyError: 'a bug'"
