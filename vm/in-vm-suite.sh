#!/bin/bash
# Runs inside the VM (copied to the work disk as /work/nodeagent-vm-run.sh and
# started by PID 1). Reads /work/vm.conf (SUITE_TIMEOUT and the PYTEST_ARGS
# array, written by run-kernel-suite.sh), runs the kernel suite with CI=true
# (so a missing capability fails instead of skipping), and leaves in
# /work/results: pytest.log, junit.xml, status (pytest's exit status) and
# env.txt (kernel, packages). The live output also goes to the second serial
# port (/dev/ttyS1), which the host prints while the suite runs.
set -u
source /work/vm.conf
results=/work/results
mkdir -p "$results"
out=/dev/ttyS1
[ -c "$out" ] || out=/dev/null

{
    echo "kernel: $(uname -r) ($(uname -v))"
    echo "python: $(/opt/nodeagent-venv/bin/python --version 2>&1)"
    echo "nft: $(nft --version 2>&1)"
    echo "iptables: $(iptables --version 2>&1)"
    echo "bcc: $(dpkg-query -W -f='${Version}' python3-bpfcc 2>&1)"
    tree=/var/cache/nodeagent/kernel-headers/$(uname -r)
    echo "headers: $tree ($(cat "$tree/.nodeagent-complete" 2>/dev/null || echo 'not merged'))"
    echo "btf: $( [ -e /sys/kernel/btf/vmlinux ] && echo present || echo missing)"
    echo "cpus: $(nproc), memory: $(awk '/MemTotal/ {print $2 " kB"}' /proc/meminfo)"
    t0=$(date +%s%N)
    /opt/nodeagent-venv/bin/python -c "import sys; sys.path.insert(0, '/work/main'); from redirect.netns import entered" \
        && echo "python start + import redirect.netns: $(( ($(date +%s%N) - t0) / 1000000 )) ms"
} >"$results/env.txt" 2>&1
cat "$results/env.txt" >"$out"

export CI=true PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 HOME=/root LANG=C.UTF-8
export PATH=/opt/nodeagent-venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
cd /work/main
start=$(date +%s)
timeout -k 15 "$SUITE_TIMEOUT" python -m pytest -q -ra -p no:cacheprovider \
    --junitxml="$results/junit.xml" "${PYTEST_ARGS[@]}" 2>&1 | tee "$results/pytest.log" >"$out"
status=${PIPESTATUS[0]}
if [ "$status" = 124 ] || [ "$status" = 137 ]; then
    echo "nodeagent-vm: the suite exceeded its ${SUITE_TIMEOUT}s timeout and was stopped" | tee -a "$results/pytest.log" >"$out"
fi
echo "$(( $(date +%s) - start ))" >"$results/suite-seconds"
echo "$status" >"$results/status"
sync
exit "$status"
