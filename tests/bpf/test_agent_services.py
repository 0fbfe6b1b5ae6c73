"""The agent's Service mode against the kernel, without an API server: in netfilter mode a Shape
with services gets its SERVICE program linked at the node namespace's netfilter hooks (both
families, POST_ROUTING and LOCAL_IN) and SERVICE_NAT at POST_ROUTING after SNAT, pinned under
the pin root, adopted by the next sync and unlinked when the Shape drops services; in fallback
mode the Shape runs the Service fallback in place of services (its verdicts written into
`svc_verdict`) and nothing is linked."""

from __future__ import annotations

import dataclasses
import ipaddress
import os
from pathlib import Path

import pytest

from stockade.agent.attachments import Attachments
from stockade.agent.programs import Programs
from stockade.agent.services import FALLBACK, NETFILTER, NetfilterLinks
from stockade.agent.sync import Syncer
from stockade.compiler import abi, ir
from stockade.compiler.render import Hook
from stockade.compiler.shape import Shape
from stockade.datapath import attach, libbpf
from stockade.datapath.clang import Compiler
from stockade.datapath.netns import NetnsExecutor
from tests.bpf.agent_harness import CACHE_DIR, Cluster, pin_root
from tests.fixtures.netns import MakeTopology


def _links(root: Path) -> dict[str, int]:
    """Pinned netfilter links: pin name -> program id."""
    out = {}
    folder = root / "netfilter"
    for pin in sorted(folder.iterdir()) if folder.is_dir() else []:
        fd = libbpf.obj_get(pin)
        try:
            info = libbpf.link_info(fd)
            assert info.link_type == attach.BPF_LINK_TYPE_NETFILTER
            out[pin.name] = info.prog_id
        finally:
            os.close(fd)
    return out


def _syncer(
    root: Path, executor: NetnsExecutor, cluster: Cluster, shape: Shape, mode: str
) -> Syncer:
    objects = cluster.table_objects(shape)
    return Syncer(
        "node-1",
        lambda: objects,
        Programs(Compiler(CACHE_DIR), root),
        Attachments(root, executor),
        None,
        root,
        service_mode=mode,
        netfilter=NetfilterLinks(root, executor),
    )


def test_netfilter_mode_links_the_service_program_and_unlinks_it_without_services(
    topology: MakeTopology,
) -> None:
    topo = topology(nodes=2)
    cluster = Cluster.create(topo)
    executor = NetnsExecutor.named(topo.node("node-1").netns)
    with pin_root() as root:
        try:
            syncer = _syncer(root, executor, cluster, Shape(services=True), NETFILTER)
            syncer.sync()
            service = syncer.programs.programs[Hook.SERVICE]
            nat = syncer.programs.programs[Hook.SERVICE_NAT]
            assert _links(root) == {
                "nf-ip-local-in": service.id,
                "nf-ip-post-routing": service.id,
                "nf-ip-post-routing-nat": nat.id,
                "nf-ip6-local-in": service.id,
                "nf-ip6-post-routing": service.id,
                "nf-ip6-post-routing-nat": nat.id,
            }
            assert syncer.netfilter.attaches == 1
            syncer.sync()  # nothing changed: the links stay as they are
            assert syncer.netfilter.attaches == 1
            syncer.close()
            syncer = _syncer(root, executor, cluster, Shape(), NETFILTER)
            syncer.sync()
            assert Hook.SERVICE not in syncer.programs.programs
            assert Hook.SERVICE_NAT not in syncer.programs.programs
            assert _links(root) == {}
        finally:
            syncer.close()
            syncer.netfilter.remove()
            executor.close()


@pytest.mark.parametrize("shape", [Shape(services=True), Shape()], ids=["services", "none"])
def test_fallback_mode_runs_the_shape_without_services(
    topology: MakeTopology, shape: Shape
) -> None:
    """With services published, the node runs the Service fallback instead and writes the
    published verdicts into `svc_verdict`."""
    topo = topology(nodes=2)
    cluster = Cluster.create(topo)
    lowered = cluster.tables
    client = lowered().endpoints[0]
    verdicts = (
        ir.ServiceVerdictEntry(
            client.endpoint_id, ipaddress.ip_address("10.96.0.10"), 6, 80, ir.Action.DENY, 0, True
        ),
    )
    cluster.tables = lambda: dataclasses.replace(lowered(), service_verdicts=verdicts)  # type: ignore[method-assign]
    executor = NetnsExecutor.named(topo.node("node-1").netns)
    with pin_root() as root:
        syncer = _syncer(root, executor, cluster, shape, FALLBACK)
        try:
            syncer.sync()
            assert syncer.programs.shape is not None and not syncer.programs.shape.services
            assert syncer.programs.shape.service_fallback is shape.services
            assert set(syncer.programs.programs) == {Hook.FROM_POD, Hook.TO_POD}
            assert _links(root) == {}
            assert syncer.maps is not None
            if shape.services:
                spec = abi.MAPS["svc_verdict"]
                assert spec.key is not None and spec.value is not None
                fd = syncer.maps.fd("svc_verdict")
                written = dict(libbpf.map_dump(fd, spec.key.size, spec.value.size))
                assert written == {e.key(): e.value() for e in verdicts}
            else:
                assert "svc_verdict" not in syncer.maps.fds
        finally:
            syncer.close()
            executor.close()


def test_this_kernel_links_netfilter_programs() -> None:
    assert attach.netfilter_supported()  # Linux >= 6.4: the sandbox kernel is 6.18
