"""The datapath's own verdict on a connection, for `stockade explain`: a crafted first packet
(`stockade.datapath.packets`) run through the programs this agent has loaded and pinned
(BPF_PROG_TEST_RUN on the same program objects the pods' interfaces run, with the node's live
maps), never sent anywhere.

For each end of the connection that is an endpoint of this node, the probe runs through that
hook: the source's `from_pod` program (egress; the test run's device is bound to the source's
endpoint for the run, as the agent binds a pod's interface) and the destination's `to_pod`
program (ingress). The answer names the verdict (the program's return code) and the deciding
rule: the rule of the conntrack entry an allowed probe created, else the one rule whose counter
moved. Probes leave no state behind: the conntrack entries they created are deleted (a trace
must not open a path for replies) and the device binding is restored. They count like packets:
a probe adds one to its rule's counter and a denied one is a drop event in the flow log.

`stockade.agent.app` serves it at `/trace` (`stockade.agent.routes`), under the agent's sync lock.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass

from stockade.agent.flows import rule_identity
from stockade.agent.programs import Programs
from stockade.compiler import abi, ir
from stockade.compiler.render import Hook
from stockade.datapath import libbpf, maps, packets
from stockade.datapath.events import read_counters

TC_ACT_UNSPEC = -1  # TCX_NEXT: the program lets the packet go on (allow)
TC_ACT_SHOT = 2  # drop
PROBE_SPORT = 65001  # the probe's source port: outside the usual ephemeral range

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
PROTOCOLS = {
    "TCP": ir.PROTO_TCP,
    "UDP": ir.PROTO_UDP,
    "SCTP": ir.PROTO_SCTP,
    "ICMP": ir.PROTO_ICMP,
    "ICMPV6": ir.PROTO_ICMPV6,
}


@dataclass(frozen=True)
class Probe:
    """A connection's first packet, as `/trace` receives it (checked by `parse`)."""

    src: Address
    dst: Address
    protocol: int
    port: int  # destination port, or ICMP type << 8 | code

    @classmethod
    def parse(cls, query: Mapping[str, str]) -> Probe:
        """ValueError naming the parameter when one is missing or bad."""
        addresses = []
        for name in ("src", "dst"):
            text = query.get(name)
            if text is None:
                raise ValueError(f"{name}: missing (an IPv4 or IPv6 address)")
            try:
                addresses.append(ipaddress.ip_address(text))
            except ValueError:
                raise ValueError(f"{name}: {text!r} is not an IP address") from None
        src, dst = addresses
        if src.version != dst.version:
            raise ValueError("src, dst: one address family for both")
        protocol = PROTOCOLS.get(query.get("protocol", "TCP").upper())
        if protocol is None:
            raise ValueError(f"protocol: one of {', '.join(PROTOCOLS)}")
        icmp = protocol in (ir.PROTO_ICMP, ir.PROTO_ICMPV6)
        if icmp and (protocol == ir.PROTO_ICMP) != (src.version == 4):
            raise ValueError("protocol: ICMP goes with IPv4 and ICMPv6 with IPv6")
        text = query.get("port", "0" if icmp else "")
        if not text.isdigit() or not 0 <= int(text) <= 0xFFFF:
            raise ValueError(f"port: {text!r} is not a port 0-65535 (ICMP: type * 256 + code)")
        return cls(src, dst, protocol, int(text))

    def packet(self) -> ir.Packet:
        return ir.Packet(self.src, self.dst, self.protocol, self.port)


def _endpoint(
    pinned: maps.PinnedMaps, address: ipaddress.IPv4Address | ipaddress.IPv6Address
) -> int | None:
    raw = libbpf.map_lookup(
        pinned.fd("endpoints"), ir.to_v6(address).packed, abi.ENDPOINT_VALUE.size
    )
    return None if raw is None else int(abi.ENDPOINT_VALUE.unpack(raw)[0])


def _conntrack_flows(pinned: maps.PinnedMaps) -> dict[bytes, int]:
    """The tracked flows: original tuple (a ct_key) -> the rule id of its flow."""
    out = {}
    dump = libbpf.map_dump(pinned.fd("conntrack"), abi.CT_KEY.size, abi.CT_ENTRY.size)
    for key, value in dump:
        for slot, flow in enumerate(maps.ct_flows(value)):
            if abi.CT_FLOW.get(flow, "expires_ns"):
                out[maps.ct_original(key, slot)] = int(abi.CT_FLOW.get(flow, "rule_id"))
    return out


class Tracer:
    """Runs probes through the programs in force; the caller holds the agent's sync lock."""

    def __init__(self, programs: Programs) -> None:
        self.programs = programs

    def trace(
        self,
        probe: Probe,
        pinned: maps.PinnedMaps | None,
        rules: Mapping[int, ir.RuleInfo],
    ) -> list[dict[str, object]]:
        """One answer per hook of this node the probe goes through (none: neither end is an
        endpoint here)."""
        if pinned is None or not self.programs.programs:
            return []
        out = []
        for hook, address in ((Hook.FROM_POD, probe.src), (Hook.TO_POD, probe.dst)):
            endpoint = _endpoint(pinned, address)
            if endpoint is not None:
                out.append(self._run(hook, endpoint, probe, pinned, rules))
        return out

    def _run(
        self,
        hook: Hook,
        endpoint: int,
        probe: Probe,
        pinned: maps.PinnedMaps,
        rules: Mapping[int, ir.RuleInfo],
    ) -> dict[str, object]:
        ids = sorted({ir.RULE_NONE, *rules})
        counters = pinned.fd("counters")
        before = read_counters(counters, ids)
        tracked = set(_conntrack_flows(pinned))
        bindings = maps.Bindings(pinned)
        bound = bindings.read().get(maps.LOOPBACK_IFINDEX)
        frame = packets.packet_frame(probe.packet(), sport=PROBE_SPORT)
        try:
            if hook is Hook.FROM_POD:
                bindings.bind(maps.LOOPBACK_IFINDEX, endpoint)
            result = libbpf.prog_test_run(self.programs.programs[hook].fd, frame)
        finally:
            if hook is Hook.FROM_POD:
                if bound is None:
                    bindings.unbind(maps.LOOPBACK_IFINDEX)
                else:
                    bindings.bind(maps.LOOPBACK_IFINDEX, bound)
        conntrack_rule = self._forget(pinned, probe, tracked)
        after = read_counters(counters, ids)
        moved = [i for i in ids if after[i].packets > before[i].packets]
        if result.retval == TC_ACT_UNSPEC:
            verdict = "allow"
        elif result.retval == TC_ACT_SHOT:
            verdict = "deny"
        else:
            verdict = f"unexpected return code {result.retval}"
        rule_id = (
            conntrack_rule
            if conntrack_rule is not None
            else (moved[0] if len(moved) == 1 else None)
        )
        return {
            "direction": "egress" if hook is Hook.FROM_POD else "ingress",
            "endpoint": endpoint,
            "verdict": verdict,
            "ruleId": rule_id,
            "rule": rule_identity(rules.get(rule_id)) if rule_id is not None else None,
            "countersMoved": moved,
        }

    @staticmethod
    def _forget(pinned: maps.PinnedMaps, probe: Probe, tracked: set[bytes]) -> int | None:
        """Delete the conntrack entries the probe created (the flow's, and the reply's when
        the programs keep one); the rule id the flow's entry names."""
        pair = {ir.to_v6(probe.src).packed, ir.to_v6(probe.dst).packed}
        ports = probe.protocol in (ir.PROTO_TCP, ir.PROTO_UDP, ir.PROTO_SCTP)
        rule_id = None
        flows = _conntrack_flows(pinned)
        for key in set(flows) - tracked:
            saddr, daddr, sport, dport, proto, _, _ = abi.CT_KEY.unpack(key)
            if {saddr, daddr} != pair or proto != probe.protocol:
                continue
            sport_, dport_ = int.from_bytes(sport, "big"), int.from_bytes(dport, "big")
            if ports and PROBE_SPORT not in (sport_, dport_):
                continue
            if saddr == ir.to_v6(probe.src).packed:
                rule_id = flows[key]
            maps.forget_conntrack(pinned, key)
        return rule_id
