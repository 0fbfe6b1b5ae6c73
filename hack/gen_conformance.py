#!/usr/bin/env python3
"""Write a conformance case file (shared/conformance/FORMAT.md) of random cases, with the
expectations of stockade's reference evaluator.

    .venv/bin/python hack/gen_conformance.py --seed 7 --cases 200 -o /tmp/generated.yaml
    .venv/bin/stockade conformance run /tmp/generated.yaml --engine datapath

The model is the 9-pod one (namespaces x, y, z; pods a, b, c), pinned to two nodes, where every
pod serves TCP 80 and, by the seed, a few more ports under names whose number differs from pod to
pod (`web` is TCP 81 on some pods and TCP 8080 on others, `dns` UDP 53 or 5353). Each case
creates standard and stockade NetworkPolicies whose rules mix podSelector, namespaceSelector and
ipBlock peers (a pod's /32, its node's range, a block holding every pod, the whole space; excepts
cutting pods out) with numbered, ranged and named ports; a second step may relabel a pod or a
namespace, or replace a policy. The probes check every ordered pair of distinct pods (or a sample
of them, `--checks-per-probe`) on ports the destination serves.

The expectations are the reference engine's (`stockade conformance run --engine reference`), so
the file is as good as the evaluator: the other engines are compared with it. Prefix lengths
depend on the family (a node's pods are a /24 or a /64), so a file is written for one family
(`--ip-family`) and is to be run with the same one. The same seed always writes the same file;
`tests/conformance/test_generated_cases.py` runs a fixed seed in CI and `STOCKADE_GEN_SEED` a
fresh one.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path
from typing import Any

import yaml

from stockade.conformance.casefile import Expect, parse_case_file
from stockade.conformance.engine import Outcome
from stockade.conformance.engines.reference import ReferenceEngine
from stockade.conformance.runner import resolve_action

NAMESPACES = ("x", "y", "z")
PODS = tuple(f"{ns}/{p}" for ns in NAMESPACES for p in "abc")
NODES = ("node-1", "node-2")
# Named ports whose number differs between pods: (name, protocol, the numbers it may have).
NAMED = (("web", "TCP", (81, 8080)), ("dns", "UDP", (53, 5353)))
# The lengths of `prefix(podIP(..), N)` by family: one node's pods, every pod, wider, everything.
NODE_RANGE = {4: 24, 6: 64}
WIDE = (16, 4, 0)


class Generator:
    """One seeded draw of a model and its cases (no expectations yet)."""

    def __init__(self, seed: int, family: int, checks_per_probe: int) -> None:
        self.rng = random.Random(seed)
        self.family = family
        self.checks_per_probe = checks_per_probe
        self.node = {pod: self.rng.choice(NODES) for pod in PODS}
        self.serves: dict[str, list[dict[str, Any]]] = {}
        for pod in PODS:
            serves = [{"port": 80, "protocol": "TCP", "name": "serve-80-tcp"}]
            for name, protocol, numbers in NAMED:
                if self.rng.random() < 0.7:
                    serves.append(
                        {"port": self.rng.choice(numbers), "protocol": protocol, "name": name}
                    )
            if self.rng.random() < 0.3:
                serves.append({"port": 81, "protocol": "UDP", "name": "serve-81-udp"})
            self.serves[pod] = serves

    # -- the model ----------------------------------------------------------------------------

    def model(self) -> dict[str, Any]:
        return {
            "namespaces": {
                ns: {"labels": {"kubernetes.io/metadata.name": ns, "ns": ns}} for ns in NAMESPACES
            },
            "nodes": {node: {"labels": {"kubernetes.io/os": "linux"}} for node in NODES},
            "pods": {
                pod: {
                    "labels": {"pod": pod.split("/")[1]},
                    "node": self.node[pod],
                    "serves": self.serves[pod],
                }
                for pod in PODS
            },
        }

    # -- policies -----------------------------------------------------------------------------

    def _selector(self, key: str, values: tuple[str, ...]) -> dict[str, Any]:
        if self.rng.random() < 0.7:
            return {"matchLabels": {key: self.rng.choice(values)}}
        chosen = self.rng.sample(values, self.rng.randint(1, 2))
        operator = self.rng.choice(("In", "NotIn"))
        return {"matchExpressions": [{"key": key, "operator": operator, "values": chosen}]}

    def _ip_block(self) -> dict[str, Any]:
        pod = self.rng.choice(PODS)
        kind = self.rng.choice(("pod", "node", "wide", "wide"))
        if kind == "pod":
            return {"cidr": f"podIP({pod})/32"}
        if kind == "node":
            length = NODE_RANGE[self.family]
            inside = [p for p in PODS if self.node[p] == self.node[pod]]
            block: dict[str, Any] = {"cidr": f"prefix(podIP({pod}),{length})"}
            excepts = [f"podIP({p})/32" for p in self.rng.sample(inside, self.rng.randint(0, 2))]
        else:
            block = {"cidr": f"prefix(podIP({pod}),{self.rng.choice(WIDE)})"}
            excepts = [f"podIP({p})/32" for p in self.rng.sample(PODS, self.rng.randint(0, 2))]
            if self.rng.random() < 0.3:
                length = NODE_RANGE[self.family]
                excepts.append(f"prefix(podIP({self.rng.choice(PODS)}),{length})")
        if excepts:
            block["except"] = sorted(set(excepts))
        return block

    def _peer(self) -> dict[str, Any]:
        kind = self.rng.choice(("pod", "ns", "both", "ip", "ip"))
        if kind == "ip":
            return {"ipBlock": self._ip_block()}
        peer: dict[str, Any] = {}
        if kind in ("pod", "both"):
            peer["podSelector"] = self._selector("pod", ("a", "b", "c"))
        if kind in ("ns", "both"):
            peer["namespaceSelector"] = (
                {} if self.rng.random() < 0.3 else self._selector("ns", NAMESPACES)
            )
        return peer

    def _port(self) -> dict[str, Any]:
        kind = self.rng.choice(("number", "range", "named", "named", "named", "protocol"))
        protocol = self.rng.choice(("TCP", "UDP"))
        if kind == "number":
            return {"protocol": protocol, "port": self.rng.choice((80, 81, 53, 8080))}
        if kind == "range":
            start = self.rng.choice((53, 79, 80, 81, 5000, 8000))
            return {
                "protocol": protocol,
                "port": start,
                "endPort": start + self.rng.randint(0, 3100),
            }
        if kind == "named":
            name, named_protocol, _ = self.rng.choice(NAMED)
            name = self.rng.choice((name, name, name, "serve-80-tcp", "serve-81-udp", "absent"))
            # Mostly the protocol the name is served with; sometimes another one, which must
            # not match.
            chosen = named_protocol if self.rng.random() < 0.8 else protocol
            if name.startswith("serve-"):
                chosen = name.rsplit("-", 1)[1].upper()
            return {"protocol": chosen, "port": name}
        return {"protocol": protocol}

    def policy(self, name: str, stockade: bool | None = None) -> dict[str, Any]:
        if stockade is None:
            stockade = self.rng.random() < 0.25
        namespace = self.rng.choice(NAMESPACES)
        directions = self.rng.choice((["Ingress"], ["Egress"], ["Ingress", "Egress"]))
        spec: dict[str, Any] = {
            "podSelector": {}
            if self.rng.random() < 0.5
            else self._selector("pod", ("a", "b", "c")),
            "policyTypes": directions,
        }
        for direction, peer_key in (("Ingress", "from"), ("Egress", "to")):
            if direction not in directions:
                continue
            rules = []
            for _ in range(self.rng.randint(0, 3)):
                rule: dict[str, Any] = {}
                if self.rng.random() < 0.8:
                    rule[peer_key] = [self._peer() for _ in range(self.rng.randint(1, 3))]
                if self.rng.random() < 0.8:
                    rule["ports"] = [self._port() for _ in range(self.rng.randint(1, 3))]
                if stockade and self.rng.random() < 0.4:
                    rule["action"] = "Deny"
                rules.append(rule)
            spec[direction.lower()] = rules
        return {
            "apiVersion": "stockade.io/v1alpha1" if stockade else "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": {"name": name, "namespace": namespace},
            "spec": spec,
        }

    # -- cases --------------------------------------------------------------------------------

    def _probes(self) -> list[dict[str, Any]]:
        served = sorted({(s["protocol"], s["port"]) for ss in self.serves.values() for s in ss})
        probes = []
        for protocol, port in self.rng.sample(served, min(len(served), self.rng.randint(2, 3))):
            targets = [
                p
                for p in PODS
                if any(s["protocol"] == protocol and s["port"] == port for s in self.serves[p])
            ]
            pairs = [(a, b) for a in PODS for b in targets if a != b]
            if self.checks_per_probe and len(pairs) > self.checks_per_probe:
                pairs = sorted(self.rng.sample(pairs, self.checks_per_probe))
            checks = [
                {"from": a, "to": b, "protocol": protocol, "port": port, "expect": "allowed"}
                for a, b in pairs
            ]
            probes.append({"protocol": protocol, "port": port, "checks": checks})
        return probes

    def case(self, index: int) -> dict[str, Any]:
        policies = [self.policy(f"gen-{i}") for i in range(self.rng.randint(1, 3))]
        steps: list[dict[str, Any]] = [
            {
                "step": 1,
                "actions": [{"create_policy": p} for p in policies],
                "probes": self._probes(),
            }
        ]
        if self.rng.random() < 0.5:
            change = self.rng.choice(("pod", "namespace", "policy"))
            if change == "pod":
                action: dict[str, Any] = {
                    "add_pod_labels": {
                        "pod": self.rng.choice(PODS),
                        "labels": {"pod": self.rng.choice("abc")},
                    }
                }
            elif change == "namespace":
                action = {
                    "add_namespace_labels": {
                        "namespace": self.rng.choice(NAMESPACES),
                        "labels": {"ns": self.rng.choice(NAMESPACES)},
                    }
                }
            else:
                old = self.rng.choice(policies)
                new = self.policy(old["metadata"]["name"], old["apiVersion"].startswith("stockade"))
                new["metadata"] = old["metadata"]
                action = {"update_policy": new}
            steps.append({"step": 2, "actions": [action], "probes": self._probes()})
        return {
            "id": f"gen-{index:04d}",
            "name": f"generated case {index}",
            "tags": ["generated"],
            "profile": "standard",
            "steps": steps,
        }


def expect_from_reference(raw: dict[str, Any], family: int) -> None:
    """Fill in every check's `expect` with what the reference engine observes."""
    casefile = parse_case_file(raw)
    engine = ReferenceEngine(family)
    for raw_case, case in zip(raw["cases"], casefile.cases, strict=True):
        addresses = engine.setup(casefile.topology, case)
        try:
            for raw_step, step in zip(raw_case["steps"], case.steps, strict=True):
                for action in step.actions:
                    engine.apply(resolve_action(action, addresses))
                observed = iter(engine.probe(step.checks))
                for probe in raw_step["probes"]:
                    for check in probe["checks"]:
                        seen = next(observed)
                        if seen.outcome is Outcome.REFUSED:
                            raise RuntimeError(f"{case.id}: {seen.check} probes a port not served")
                        allowed = seen.outcome is Outcome.CONNECTED
                        check["expect"] = (Expect.ALLOWED if allowed else Expect.DENIED).value
        finally:
            engine.teardown()


def generate(seed: int, cases: int, family: int, checks_per_probe: int = 0) -> dict[str, Any]:
    generator = Generator(seed, family, checks_per_probe)
    raw: dict[str, Any] = {
        "source": {
            "note": (
                f"generated by hack/gen_conformance.py --seed {seed} --cases {cases} "
                f"--ip-family {family}: run it with --ip-family {family}; expectations from "
                "stockade's reference evaluator"
            )
        },
        "model": generator.model(),
        "cases": [generator.case(i) for i in range(cases)],
    }
    expect_from_reference(raw, family)
    return raw


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--cases", type=int, default=200)
    parser.add_argument("--ip-family", type=int, choices=(4, 6), default=4)
    parser.add_argument(
        "--checks-per-probe",
        type=int,
        default=0,
        help="check at most this many pairs per probed port (default 0: every pair)",
    )
    parser.add_argument("-o", "--output", type=Path, help="where to write (default: stdout)")
    args = parser.parse_args(argv)
    raw = generate(args.seed, args.cases, args.ip_family, args.checks_per_probe)
    text = yaml.safe_dump(raw, sort_keys=False, width=100)
    if args.output is None:
        sys.stdout.write(text)
    else:
        args.output.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
