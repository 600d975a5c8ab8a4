"""Render a capture plan to a native nftables table owned by nodeagent (pure).

The default backend: one table (``inet nodeagent``, or ``ip nodeagent`` when
IPv6 is off) that nodeagent alone owns, so it never edits anyone else's rules
and never depends on the iptables legacy/nft split. ``render`` returns ``nft -f``
text that is ONE transaction: ``add table`` (a no-op if it exists), ``delete
table`` (drops whatever was there), then the full table. Loading it any number
of times leaves exactly one copy of the rules; a failure leaves the old table.

Every rule carries the comment ``nodeagent:<name>:<digest>``; ``parse_state``
reads ``nft -j list table`` output back into the same shape ``desired_state``
builds from the plan, so drift (a rule deleted, added, reordered or changed by
nodeagent's own newer plan) is a plain comparison.

A rule with ``daddr_set`` (the node plan's probe SNAT) matches ``@set``, a
named set of the table holding its addresses: ``render_elements`` adds or
deletes single addresses in one small transaction, without reloading the
table; the set's members are part of the drift comparison.
"""
from __future__ import annotations

import json
import posixpath
import ipaddress
from dataclasses import dataclass, field
from typing import Mapping, Sequence

from .plan import NODE_OWNER, OWNER, CaptureError, CapturePlan, Hook, Rule

# nft 1.0.6 refuses the symbolic ``dstnat`` for a nat output chain: use numbers.
NAT_PRIORITY = -100  # dstnat: prerouting, output
SNAT_PRIORITY = 100  # srcnat: postrouting
PRIORITIES: Mapping[str, int] = {"prerouting": NAT_PRIORITY, "output": NAT_PRIORITY, "postrouting": SNAT_PRIORITY}
OWNERS = (OWNER, NODE_OWNER)  # every table nodeagent may own in a namespace
# nft resolves `socket cgroupv2` paths relative to this directory, whatever the mount.
NFT_CGROUP_BASE = "/sys/fs/cgroup"
TABLE_FAMILIES = ("inet", "ip")


def table_family(plan: CapturePlan) -> str:
    return "inet" if plan.ipv6 else "ip"


def nft_cgroup_path(plan: CapturePlan, cgroup: str) -> str:
    """The string nft needs for a cgroup: its path relative to /sys/fs/cgroup."""
    full = posixpath.normpath(posixpath.join(plan.cgroup2_mount, cgroup))
    rel = posixpath.relpath(full, NFT_CGROUP_BASE)
    if rel.startswith(".."):
        raise CaptureError(
            f"nftables resolves cgroup paths under {NFT_CGROUP_BASE} only, but cgroup v2 is mounted at "
            f"{plan.cgroup2_mount}: use the iptables backend for host mode, or mount cgroup2 below {NFT_CGROUP_BASE}")
    return rel


def _set(items: tuple) -> str:
    return str(items[0]) if len(items) == 1 else "{ " + ", ".join(str(i) for i in items) + " }"


SET_TYPES: Mapping[str, str] = {"ipv4": "ipv4_addr", "ipv6": "ipv6_addr"}


def _element(cidr: str) -> str:
    """A named set's member: the address of a host CIDR (the sets hold addresses, not ranges)."""
    address, _, length = str(cidr).partition("/")
    host = "128" if ":" in address else "32"
    if length not in ("", host):
        raise CaptureError(f"nft set member {cidr!r} is a range; named sets hold single addresses")
    return address


def named_sets(plan: CapturePlan) -> dict[str, tuple[str, tuple[str, ...]]]:
    """The plan's named sets: name -> (nft type, members in order)."""
    out: dict[str, tuple[str, tuple[str, ...]]] = {}
    families = plan.families
    for rule in plan.rules:
        if rule.daddr_set is None or rule.family not in families:
            continue
        if rule.family is None:
            raise CaptureError(f"rule {rule.name}: a set of addresses needs the rule's family")
        members = tuple(_element(a) for a in rule.daddrs)
        seen = out.get(rule.daddr_set)
        if seen is not None and seen != (SET_TYPES[rule.family], members):
            raise CaptureError(f"rules disagree on the members of set {rule.daddr_set}")
        out[rule.daddr_set] = (SET_TYPES[rule.family], members)
    return out


def render_rule(plan: CapturePlan, rule: Rule) -> str:
    parts: list[str] = []
    if rule.mark is not None:
        value, mask = rule.mark
        parts.append(f"meta mark & {mask:#x} == {value:#x}")
    if rule.iif:
        parts.append(f'iifname "{rule.iif}"')
    if rule.oif:
        parts.append(f'oifname "{rule.oif}"')
    proto = "ip" if rule.family == "ipv4" else "ip6"
    if rule.saddrs:
        parts.append(f"{proto} saddr {_set(rule.saddrs)}")
    if rule.daddr_set is not None:
        parts.append(f"{proto} daddr @{rule.daddr_set}")
    elif rule.daddrs:
        parts.append(f"{proto} daddr {_set(rule.daddrs)}")
    if rule.cgroup is not None:
        parts.append(f'socket cgroupv2 level {rule.cgroup_level} "{nft_cgroup_path(plan, rule.cgroup)}"')
    if rule.dports:
        parts.append(f"tcp dport {_set(rule.dports)}")
    elif rule.tcp and not rule.midstream:
        parts.append("meta l4proto tcp")
    if rule.midstream:
        # As iptables' `! --syn`: every TCP packet but a bare SYN (a SYN opens a connection).
        parts.append("tcp flags & (fin | syn | rst | ack) != syn")
    if rule.socket_mark is not None:
        # `socket wildcard 0`: as xt_socket (iptables), a listener bound to any address
        # (0.0.0.0 / ::) is not "the socket the packet is for".
        value, mask = rule.socket_mark
        parts.append(f"socket wildcard 0 socket mark & {mask:#x} == {value:#x}")
    if rule.local_socket:
        # nft has no "socket exists" match: `meta skuid` only matches a packet that
        # belongs to a full local socket (as xt_owner's --socket-exists); every uid is >= 0.
        parts.append("meta skuid >= 0")
    if rule.action == "return":
        parts.append("return")
    elif rule.action == "snat":
        parts.append(f"snat {proto} to {rule.to_addr}")
    else:
        parts.append(f"redirect to :{rule.to_port}")
    parts.append(f'comment "{rule.comment}"')
    return " ".join(parts)


def _chain_header(hook: Hook) -> str:
    return f"type nat hook {hook} priority {PRIORITIES[hook]}; policy accept;"


def _drop_tables(owners: tuple[str, ...] = (OWNER,)) -> list[str]:
    # `add` first so `delete` never fails on a fresh namespace: the idiom that
    # makes one `nft -f` both create and replace.
    lines = []
    for owner in owners:
        for fam in TABLE_FAMILIES:
            lines += [f"add table {fam} {owner}", f"delete table {fam} {owner}"]
    return lines


def render(plan: CapturePlan) -> str:
    """`nft -f` text that atomically (re)creates the plan owner's table (and nothing else)."""
    fam = table_family(plan)
    families = plan.families
    lines = _drop_tables((plan.owner,))
    lines.append(f"table {fam} {plan.owner} {{")
    for name, (kind, members) in named_sets(plan).items():
        lines.append(f"\tset {name} {{")
        lines.append(f"\t\ttype {kind}")
        if members:  # `elements = { }` is a syntax error
            lines.append(f"\t\telements = {{ {', '.join(members)} }}")
        lines.append("\t}")
    for hook in plan.hooks:
        lines.append(f"\tchain {hook} {{")
        lines.append(f"\t\t{_chain_header(hook)}")
        for rule in plan.rules_for(hook):
            if rule.family is None or rule.family in families:
                lines.append(f"\t\t{render_rule(plan, rule)}")
        lines.append("\t}")
    lines.append("}")
    return "\n".join(lines) + "\n"


def render_elements(plan: CapturePlan, add: Sequence[str] = (), delete: Sequence[str] = ()) -> str:
    """`nft -f` text adding and deleting single addresses in the plan's named sets, ONE
    transaction. Each address goes to the set of its family; deleting an address the
    set does not hold, or touching a table or set that does not exist, fails the whole
    batch (the caller then re-applies the full plan)."""
    by_family = {rule.family: rule.daddr_set for rule in plan.rules
                 if rule.daddr_set is not None and rule.family in plan.families}
    lines = []
    for verb, addresses in (("delete", delete), ("add", add)):
        grouped: dict[str, list[str]] = {}
        for address in addresses:
            family = "ipv6" if ":" in str(address) else "ipv4"
            name = by_family.get(family)
            if name is None:
                raise CaptureError(f"plan {plan.owner} has no set for {family} address {address}")
            grouped.setdefault(name, []).append(_element(address))
        for name, members in grouped.items():
            lines.append(f"{verb} element {table_family(plan)} {plan.owner} {name} {{ {', '.join(members)} }}")
    return "\n".join(lines) + "\n" if lines else ""


def render_cleanup(owners: tuple[str, ...] = (OWNER,)) -> str:
    """`nft -f` text removing the ``owners``' tables (both families) and nothing else."""
    return "\n".join(_drop_tables(owners)) + "\n"


@dataclass(frozen=True, slots=True)
class ChainState:
    type: str | None
    hook: str | None
    priority: int | None
    policy: str | None
    rules: tuple[str, ...]  # rule comments in order; foreign rules as "<foreign rule ...>"


@dataclass(frozen=True, slots=True)
class SetState:
    type: str | None
    elements: frozenset[str]  # members as nft prints them; anything but a plain address as its JSON text


@dataclass(frozen=True, slots=True)
class TableState:
    family: str
    chains: Mapping[str, ChainState]
    owner: str = OWNER
    sets: Mapping[str, SetState] = field(default_factory=dict)


def desired_state(plan: CapturePlan) -> TableState:
    families = plan.families
    chains = {}
    for hook in plan.hooks:
        rules = tuple(r.comment for r in plan.rules_for(hook) if r.family is None or r.family in families)
        chains[hook] = ChainState("nat", hook, PRIORITIES[hook], "accept", rules)
    sets = {name: SetState(kind, frozenset(_canonical(m) for m in members))
            for name, (kind, members) in named_sets(plan).items()}
    return TableState(table_family(plan), chains, plan.owner, sets)


def _canonical(member: object) -> str:
    if isinstance(member, str):
        try:
            return str(ipaddress.ip_address(member))
        except ValueError:
            return member
    return json.dumps(member, sort_keys=True)  # a range, a concatenation...: never one of ours


def _items(listing: str, what: str) -> list:
    try:
        items = json.loads(listing).get("nftables", []) if listing.strip() else []
    except (ValueError, AttributeError) as exc:
        raise CaptureError(f"cannot parse `nft -j {what}` output: {exc}") from None
    if not isinstance(items, list):
        raise CaptureError(f"cannot parse `nft -j {what}` output: 'nftables' is not a list")
    return items


def _table_state(items: list, family: str, owner: str = OWNER) -> TableState | None:
    """The ``owner``'s table of ``family`` among listing ``items`` (None if absent)."""
    chains: dict[str, dict] = {}
    rules: dict[str, list[str]] = {}
    sets: dict[str, SetState] = {}
    found = False
    for item in items:
        kind, obj = next(iter(item.items())) if isinstance(item, dict) and item else (None, None)
        if not isinstance(obj, dict) or obj.get("family") != family:
            continue
        if kind == "table" and obj.get("name") == owner:
            found = True
        elif kind == "chain" and obj.get("table") == owner:
            chains[obj["name"]] = obj
            rules.setdefault(obj["name"], [])
        elif kind == "set" and obj.get("table") == owner:
            members = obj.get("elem", [])
            sets[str(obj.get("name"))] = SetState(
                obj.get("type") if isinstance(obj.get("type"), str) else json.dumps(obj.get("type")),
                frozenset(_canonical(m) for m in (members if isinstance(members, list) else [members])))
        elif kind == "rule" and obj.get("table") == owner:
            comment = obj.get("comment")
            if not (isinstance(comment, str) and comment.startswith(OWNER + ":")):
                comment = f"<foreign rule handle {obj.get('handle')}>"
            rules.setdefault(obj["chain"], []).append(comment)
    if not found:
        return None
    states = {
        name: ChainState(c.get("type"), c.get("hook"), c.get("prio"), c.get("policy"), tuple(rules.get(name, ())))
        for name, c in chains.items()
    }
    return TableState(family, states, owner, sets)


def parse_state(listing: str, family: str, owner: str = OWNER) -> TableState | None:
    """Read `nft -j list table FAMILY OWNER` output; None if it is empty."""
    return _table_state(_items(listing, f"list table {family} {owner}"), family, owner)


# iptables-nft keeps its nat table as native tables `ip nat` / `ip6 nat`.
IPTABLES_NFT_TABLES = {"ip": "ipv4", "ip6": "ipv6"}


@dataclass(frozen=True, slots=True)
class Ruleset:
    """What nodeagent needs to know of a namespace's nftables (for one owner, see ``OWNERS``)."""

    tables: Mapping[str, TableState]  # the owner's own tables, by family (inet, ip)
    iptables_nft: frozenset[str]  # "ipv4"/"ipv6": iptables-nft nat tables holding the owner's chains


def parse_tables(listing: str) -> frozenset[tuple[str, str]]:
    """(family, name) of every table in `nft -j list tables` output."""
    out = set()
    for item in _items(listing, "list tables"):
        table = item.get("table") if isinstance(item, dict) else None
        if isinstance(table, dict):
            out.add((table.get("family"), table.get("name")))
    return frozenset(out)


def iptables_nft_holders(tables: frozenset[tuple[str, str]]) -> tuple[str, ...]:
    """Families of the iptables-nft nat tables present (the only place its owned chains can be)."""
    return tuple(fam for fam in IPTABLES_NFT_TABLES if (fam, "nat") in tables)


def parse_owned_chains(listing: str, owned_chain_prefix: str) -> frozenset[str]:
    """From `nft -j list chains`: "ipv4"/"ipv6" where iptables-nft's nat table has an owned chain.

    A jump into an owned chain cannot exist without the chain, so the chains
    alone tell whether the iptables-nft backend holds anything of nodeagent's.
    Chains are listed without their rules: foreign rules are never parsed.
    """
    out = set()
    for item in _items(listing, "list chains"):
        chain = item.get("chain") if isinstance(item, dict) else None
        if (isinstance(chain, dict) and chain.get("table") == "nat" and chain.get("family") in IPTABLES_NFT_TABLES
                and str(chain.get("name", "")).startswith(owned_chain_prefix)):
            out.add(IPTABLES_NFT_TABLES[chain["family"]])
    return frozenset(out)


def diff(desired: TableState, actual: TableState | None) -> tuple[str, ...]:
    """Human-readable differences; empty when the kernel matches the plan."""
    if actual is None:
        return (f"table {desired.family} {desired.owner} is missing",)
    out = []
    for name, want in desired.chains.items():
        have = actual.chains.get(name)
        if have is None:
            out.append(f"chain {name} is missing")
            continue
        if (have.type, have.hook, have.priority, have.policy) != (want.type, want.hook, want.priority, want.policy):
            out.append(f"chain {name} is type {have.type} hook {have.hook} priority {have.priority} "
                       f"policy {have.policy}, want {want.type} {want.hook} {want.priority} {want.policy}")
        if have.rules != want.rules:
            missing = [r for r in want.rules if r not in have.rules]
            extra = [r for r in have.rules if r not in want.rules]
            detail = []
            if missing:
                detail.append(f"missing {missing}")
            if extra:
                detail.append(f"unexpected {extra}")
            out.append(f"chain {name}: rules differ ({'; '.join(detail) or 'order or duplicates'})")
    for name in actual.chains:
        if name not in desired.chains:
            out.append(f"unexpected chain {name}")
    for name, want_set in desired.sets.items():
        have_set = actual.sets.get(name)
        if have_set is None:
            out.append(f"set {name} is missing")
            continue
        if have_set.type != want_set.type:
            out.append(f"set {name} is type {have_set.type}, want {want_set.type}")
        missing = sorted(want_set.elements - have_set.elements)
        extra = sorted(have_set.elements - want_set.elements)
        if missing or extra:
            detail = ([f"missing {missing}"] if missing else []) + ([f"unexpected {extra}"] if extra else [])
            out.append(f"set {name}: elements differ ({'; '.join(detail)})")
    for name in actual.sets:
        if name not in desired.sets:
            out.append(f"unexpected set {name}")
    return tuple(out)
