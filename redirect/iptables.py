"""Render a capture plan to iptables text (pure), istio-iptables style.

Rules are data rendered three ways:

- ``render_restore``: ``iptables-restore --noflush`` text. nodeagent owns the
  chains named ``NODEAGENT-*`` in the nat table; each hangs off its built-in
  chain by exactly one jump. Declaring an owned chain in restore text flushes
  it, and any jumps already present are deleted in the same text, so one
  restore (one atomic commit per table) both creates and repairs.
- ``check_commands``: the ``-C`` form of every rule, for a quick membership
  check with the plain iptables command.
- ``cleanup_commands`` / ``render_cleanup``: removal in reverse order (jumps,
  then rules, then chains), touching nothing that nodeagent does not own.

Rules are written exactly as ``iptables-save`` prints them, so the state read
back by ``parse_save`` compares line for line with ``desired_state``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from .plan import OWNER, CapturePlan, Family, Hook, HOOKS, Rule

PREFIX = "NODEAGENT-"
TABLE = "nat"
BUILTIN: Mapping[Hook, str] = {"prerouting": "PREROUTING", "output": "OUTPUT", "postrouting": "POSTROUTING"}
CHAINS: Mapping[Hook, str] = {hook: PREFIX + BUILTIN[hook] for hook in HOOKS}


def prefix_of(owner: str) -> str:
    """Owned chain prefix of a plan owner: ``nodeagent`` -> ``NODEAGENT-``,
    ``nodeagent-node`` -> ``NODEAGENT_NODE-`` (never a prefix of another owner's)."""
    return owner.upper().replace("-", "_") + "-"


def chain_of(plan: CapturePlan, hook: Hook) -> str:
    return prefix_of(plan.owner) + BUILTIN[hook]


assert prefix_of(OWNER) == PREFIX
MULTIPORT_MAX = 15  # the multiport match takes at most 15 ports


def _chunks(items: tuple, size: int) -> list[tuple]:
    return [items[i:i + size] for i in range(0, len(items), size)] or [()]


def rule_args(rule: Rule, family: Family) -> list[list[str]]:
    """Arguments (after ``-A CHAIN``) for one plan rule; several when it expands.

    iptables takes one address per rule and 15 ports per multiport match, so a
    rule with address or port sets becomes several rules with the same comment
    (``daddr_set`` too: nft's named set is one rule per address here).
    """
    if rule.family not in (None, family):
        return []
    if rule.daddr_set is not None and not rule.daddrs:
        return []  # an empty set matches nothing: no rule (one without -d would match everything)
    out = []
    for saddr in rule.saddrs or (None,):
        for daddr in rule.daddrs or (None,):
            for ports in _chunks(rule.dports, MULTIPORT_MAX):
                args: list[str] = []
                if saddr:
                    args += ["-s", saddr]
                if daddr:
                    args += ["-d", daddr]
                if rule.iif:
                    args += ["-i", rule.iif]
                if rule.oif:
                    args += ["-o", rule.oif]
                if rule.tcp or rule.dports or rule.midstream:
                    args += ["-p", "tcp"]
                if rule.midstream:
                    args += ["-m", "tcp", "!", "--tcp-flags", "FIN,SYN,RST,ACK", "SYN"]  # `! --syn`, as saved
                if rule.socket_mark is not None:
                    # xt_socket has no mark test: --restore-skmark copies the socket's mark to
                    # the packet (which then routes by it), and the mark match reads it.
                    args += ["-m", "socket", "--restore-skmark"]
                if rule.local_socket:
                    args += ["-m", "owner", "--socket-exists"]
                if rule.mark is not None or rule.socket_mark is not None:
                    value, mask = rule.mark if rule.mark is not None else rule.socket_mark
                    args += ["-m", "mark", "--mark", f"{value:#x}/{mask:#x}"]
                if rule.cgroup is not None:
                    args += ["-m", "cgroup", "--path", rule.cgroup]
                if len(ports) == 1:
                    args += ["-m", "tcp", "--dport", str(ports[0])]
                elif ports:
                    args += ["-m", "multiport", "--dports", ",".join(str(p) for p in ports)]
                args += ["-m", "comment", "--comment", rule.comment]
                if rule.action == "return":
                    args += ["-j", "RETURN"]
                elif rule.action == "snat":
                    args += ["-j", "SNAT", "--to-source", str(rule.to_addr)]
                else:
                    args += ["-j", "REDIRECT", "--to-ports", str(rule.to_port)]
                out.append(args)
    return out


def _quote(args: list[str]) -> str:
    # iptables-save double-quotes string arguments of comment and cgroup path.
    words = []
    for i, arg in enumerate(args):
        if i and args[i - 1] in ("--comment", "--path"):
            arg = '"' + arg.replace('"', '\\"') + '"'
        words.append(arg)
    return " ".join(words)


def jump_args(hook: Hook, chain: str | None = None) -> list[str]:
    return ["-j", chain or CHAINS[hook]]


@dataclass(frozen=True, slots=True)
class IptablesState:
    """nodeagent's part of one backend's ruleset, as ``iptables-save`` shows it."""

    chains: Mapping[str, tuple[str, ...]]  # owned chain -> its rule lines, in order
    jumps: tuple[str, ...]  # rule lines elsewhere that jump into an owned chain (sorted)
    rule_count: int = 0  # all rules of every table (for backend detection)

    @property
    def owned(self) -> bool:
        return bool(self.chains or self.jumps)


EMPTY = IptablesState({}, ())


def desired_state(plan: CapturePlan, family: Family) -> IptablesState:
    chains = {}
    for hook in plan.hooks:
        chain = chain_of(plan, hook)
        chains[chain] = tuple(f"-A {chain} {_quote(args)}"
                              for rule in plan.rules_for(hook, family) for args in rule_args(rule, family))
    jumps = tuple(sorted(f"-A {BUILTIN[hook]} {_quote(jump_args(hook, chain_of(plan, hook)))}"
                         for hook in plan.hooks))
    return IptablesState(chains, jumps)


def parse_save(text: str, prefix: str = PREFIX) -> IptablesState:
    """Read ``iptables-save`` output: the nat chains named ``prefix``* and the jumps into
    them (one owner's, see ``prefix_of``), and a rule count."""
    table = None
    chains: dict[str, list[str]] = {}
    jumps: list[str] = []
    count = 0
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("*"):
            table = line[1:]
        elif line.startswith(":") and table == TABLE:
            name = line[1:].split()[0]
            if name.startswith(prefix):
                chains.setdefault(name, [])
        elif line.startswith("-A "):
            count += 1
            if table != TABLE:
                continue
            chain = line.split()[1]
            if chain.startswith(prefix):
                chains.setdefault(chain, []).append(line)
            elif _jump_target(line).startswith(prefix):
                jumps.append(line)
    return IptablesState({k: tuple(v) for k, v in chains.items()}, tuple(sorted(jumps)), count)


def _jump_target(line: str) -> str:
    words = line.split()
    for flag in ("-j", "-g"):
        if flag in words:
            i = words.index(flag)
            if i + 1 < len(words):
                return words[i + 1]
    return ""


def diff(desired: IptablesState, actual: IptablesState) -> tuple[str, ...]:
    out = []
    for chain, want in desired.chains.items():
        have = actual.chains.get(chain)
        if have is None:
            out.append(f"chain {chain} is missing")
        elif have != want:
            missing = [r for r in want if r not in have]
            extra = [r for r in have if r not in want]
            out.append(f"chain {chain}: rules differ (missing {missing}; unexpected {extra})"
                       if missing or extra else f"chain {chain}: rules out of order or duplicated")
    for chain in actual.chains:
        if chain not in desired.chains:
            out.append(f"unexpected owned chain {chain}")
    if actual.jumps != desired.jumps:
        out.append(f"jumps into owned chains are {list(actual.jumps)}, want {list(desired.jumps)}")
    return tuple(out)


def render_restore(plan: CapturePlan, family: Family, current: IptablesState = EMPTY) -> str:
    """``iptables-restore --noflush`` text installing the plan over ``current``.

    Declaring an owned chain flushes it; existing jumps into owned chains are
    deleted first so the result has exactly one jump per chain; owned chains
    the plan no longer needs are removed.
    """
    want = desired_state(plan, family)
    stale = sorted(c for c in current.chains if c not in want.chains)
    lines = [f"*{TABLE}"]
    lines += [f":{chain} - [0:0]" for chain in list(want.chains) + stale]
    lines += ["-D" + jump[2:] for jump in current.jumps]
    lines += [f"-X {chain}" for chain in stale]
    for chain_lines in want.chains.values():
        lines += chain_lines
    lines += [f"-A {BUILTIN[hook]} {_quote(jump_args(hook, chain_of(plan, hook)))}" for hook in plan.hooks]
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def render_cleanup(current: IptablesState) -> str | None:
    """Restore text removing everything nodeagent owns (reverse order); None if nothing.

    Jumps go first, then the owned chains are flushed (declared) and deleted.
    """
    if not current.owned:
        return None
    lines = [f"*{TABLE}"]
    lines += [f":{chain} - [0:0]" for chain in current.chains]
    lines += ["-D" + jump[2:] for jump in current.jumps]
    lines += [f"-X {chain}" for chain in reversed(list(current.chains))]
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def check_commands(plan: CapturePlan, family: Family) -> list[list[str]]:
    """``-C`` argv (without the iptables binary) for every rule and jump of the plan."""
    cmds = []
    for hook in plan.hooks:
        for rule in plan.rules_for(hook, family):
            for args in rule_args(rule, family):
                cmds.append(["-t", TABLE, "-C", chain_of(plan, hook), *args])
    for hook in plan.hooks:
        cmds.append(["-t", TABLE, "-C", BUILTIN[hook], *jump_args(hook, chain_of(plan, hook))])
    return cmds


def cleanup_commands() -> list[list[str]]:
    """Removal argv in reverse order of creation: jumps, then rules (flush), then chains."""
    cmds = [["-t", TABLE, "-D", BUILTIN[hook], *jump_args(hook)] for hook in reversed(HOOKS)]
    cmds += [["-t", TABLE, "-F", CHAINS[hook]] for hook in reversed(HOOKS)]
    cmds += [["-t", TABLE, "-X", CHAINS[hook]] for hook in reversed(HOOKS)]
    return cmds


def choose_backend(legacy: IptablesState, nft: IptablesState) -> str:
    """Pick the iptables backend already in use in a namespace.

    Our own chains decide first (keep repairing where we installed); then the
    backend that holds more rules (kube-proxy, CNI, the admin's firewall);
    on a tie or an empty namespace, nft (what current distributions default to).
    """
    if legacy.owned != nft.owned:
        return "iptables-legacy" if legacy.owned else "iptables-nft"
    if legacy.rule_count > nft.rule_count:
        return "iptables-legacy"
    return "iptables-nft"
