"""A full event ring loses events, never silently: every drop the programs could not report is
counted in `events_lost`, which the agent exports as `stockade_agent_events_lost_total`.

The ring is the smallest a shape allows (one page); nobody reads it while a burst of denied
packets runs, so it fills. Every drop is then either an event in the ring or one count in
events_lost: the two add up to the drops sent, and the rule counter saw them all.
"""

from __future__ import annotations

from stockade.compiler import ir
from stockade.compiler.ir import Action, Direction
from stockade.compiler.shape import PAGE_SIZE, Shape
from stockade.datapath import events
from stockade.harness.testrun import TcVerdict
from tests.bpf import packets as pk
from tests.bpf.datapath_harness import datapath

POD, CLIENT = "10.0.0.1", "10.0.1.7"
EP, RULE = 1, 100
SENT = 200  # far more than one page of 72-byte records holds

TABLES = ir.NodeTables(
    endpoints=(ir.EndpointEntry(pk.addr(POD), EP),),
    policy=(ir.PolicyEntry(EP, Direction.INGRESS, 32, 0, 0, 0, Action.DENY, RULE),),
)


def test_drops_the_ring_has_no_room_for_are_counted_lost() -> None:
    with datapath(Shape(events_bytes=PAGE_SIZE)) as dp:
        dp.write(TABLES)
        assert dp.maps is not None
        lost_fd = dp.maps.fd("events_lost")
        assert events.read_events_lost(lost_fd) == 0
        for port in range(1, SENT + 1):
            frame = pk.packet_frame(ir.Packet(pk.addr(CLIENT), pk.addr(POD), ir.PROTO_TCP, port))
            assert dp.run(frame, Direction.INGRESS) is TcVerdict.DENY
        received = dp.events()
        lost = events.read_events_lost(lost_fd)
        assert 0 < len(received) < SENT, "one page must fill before the burst ends"
        assert len(received) + lost == SENT
        assert [e.dport for e in received] == list(range(1, len(received) + 1))
        counted = events.read_counters(dp.maps.fd("counters"), [RULE])[RULE]
        assert counted.packets == SENT
