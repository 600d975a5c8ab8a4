"""bench mesh --counts: reading perf stat's CSV output and printing the per-request table (pure parts)."""
from __future__ import annotations

from bench import mesh

# `perf stat -x, -o FILE -e 'syscalls:sys_enter_*' -p PID` as perf 6.1 writes it (excerpt).
PERF = """# started on Thu Nov 26 08:40:01 2026

0,,syscalls:sys_enter_socket,4012345678,100.00,,
2000,,syscalls:sys_enter_read,4012345678,100.00,,
2001,,syscalls:sys_enter_epoll_pwait,4012345678,100.00,,
2000,,syscalls:sys_enter_sendto,4012345678,100.00,,
13,,syscalls:sys_enter_getpid,4012345678,100.00,,
<not counted>,,syscalls:sys_enter_write,0,0.00,,
"""


def test_perf_csv_gives_the_non_zero_counts_by_syscall():
    assert mesh._syscalls(PERF) == {"read": 2000, "epoll_pwait": 2001, "sendto": 2000, "getpid": 13}
    assert mesh._syscalls("") == {}


def test_the_counts_table_names_every_namespace_and_proxy(capsys):
    packets = {ns: {k: 0.0 for k in mesh.COUNTED} for ns in ("client", "node1", "node2", "catalog-v2")}
    packets["node1"]["IpForwDatagrams"] = 2.0
    mesh.print_counts({"name": "mesh", "requests": 1000, "counts": {
        "syscalls": [{"read": 2.0, "sendto": 2.0, "getpid": 0.001}, None], "packets": packets}})
    out = capsys.readouterr().out
    assert "source-side proxy: 4.00 system calls: read 2.00, sendto 2.00" in out and "getpid" not in out
    assert "destination-side proxy: perf counted nothing" in out
    row = next(line for line in out.splitlines() if line.split()[:1] == ["node1"])
    assert row.split()[1:3] == ["0.00", "2.00"]  # IpInReceives, IpForwDatagrams
    mesh.print_counts({"name": "chain", "requests": 5, "counts": {"syscalls": None, "packets": packets}})
    assert "perf is not installed" in capsys.readouterr().out


def test_unpin_restores_what_pin_took_and_ignores_threads_gone_meanwhile():
    import os

    mine = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(mine)})
    try:
        mesh.unpin({os.getpid(): mine, 2 ** 22 + 12345: {0}})  # the second one does not exist
        assert os.sched_getaffinity(0) == mine
    finally:
        os.sched_setaffinity(0, mine)
