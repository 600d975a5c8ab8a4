#!/usr/bin/env bash
# Installs what nodeagent needs on a Debian 12 machine, only what is missing:
# Debian packages (kernel tools, bcc, load tools) and a virtualenv with the
# pinned Python dependencies. Idempotent; safe to run before every `make`.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
DEB_PKGS=(python3 python3-venv python3-bpfcc bpfcc-tools iproute2 nftables iptables
          conntrack haproxy wrk curl procps psmisc openssl gcc libc6-dev python3-dev
          python3-cryptography)

missing=()
for p in "${DEB_PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" != 0 ]; then
        echo "setup: missing Debian packages (${missing[*]}); run as root to install them" >&2
        exit 1
    fi
    echo "setup: installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Debian's python3, so that bcc (python3-bpfcc, in /usr/lib/python3/dist-packages)
# and cryptography (python3-cryptography) are importable from the venv through
# --system-site-packages. cryptography is Debian's on purpose (docs/operations.md, "Memory"):
# it uses the system OpenSSL that `ssl` maps already, where PyPI's wheel maps a second,
# statically linked one (~6 MiB Rss per agent), and Debian's security updates patch it.
stamp="$VENV/.deps-$(sha256sum requirements.lock | cut -c1-16)"
if [ ! -f "$stamp" ]; then
    if [ ! -x "$VENV/bin/python" ]; then
        echo "setup: creating virtualenv $VENV"
        /usr/bin/python3 -m venv --system-site-packages "$VENV"
    fi
    echo "setup: installing pinned Python dependencies"
    "$VENV/bin/pip" install -q --disable-pip-version-check -r requirements.lock
    # A venv set up from an older lock holds PyPI's cryptography (and cffi, pycparser for it),
    # which would shadow Debian's.
    for stale in cryptography cffi pycparser; do
        location=$("$VENV/bin/pip" show "$stale" 2>/dev/null | sed -n 's/^Location: //p' || true)
        if [[ "$location" == "$(cd "$VENV" && pwd)/"* ]]; then
            "$VENV/bin/pip" uninstall -q -y --disable-pip-version-check "$stale"
        fi
    done
    "$VENV/bin/pip" install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
    rm -f "$VENV"/.deps-*
    touch "$stamp"
fi

# Nothing may bring PyPI's cryptography back into the venv (a package requiring a newer release
# than Debian's would): the agent would map two OpenSSL copies again.
"$VENV/bin/python" - <<'EOF'
import sys
import cryptography
if not cryptography.__file__.startswith("/usr/lib/python3/dist-packages/"):
    sys.exit(f"setup: cryptography {cryptography.__version__} is imported from {cryptography.__file__}, "
             "not Debian's python3-cryptography; find what installed it (pip show cryptography: "
             "Required-by) and remove it from the venv (docs/operations.md, \"Memory\")")
EOF

# The request path compiled with Cython (nodeagent/accel.py); a no-op when build/accel matches
# the sources. Without it the proxy runs the same code as Python (the in-process request path
# takes ~40% more CPU: docs/proxy.md).
"$VENV/bin/python" -m nodeagent.accelbuild --quiet || echo "setup: the proxy will run uncompiled (see above)" >&2

# Kernel headers for bcc (eBPF capture): the running kernel's, or Debian's header packages
# merged once under /var/cache/nodeagent/kernel-headers (a no-op when present).
"$VENV/bin/python" -m bpf.headers prepare || echo "setup: eBPF capture will be unavailable (see above)" >&2
