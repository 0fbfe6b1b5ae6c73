"""The packet builders live in the package (`stockade.datapath.packets`), where the `datapath`
conformance engine and the benchmarks use them too; tests import them from here."""

from stockade.datapath.packets import *  # noqa: F403
from stockade.datapath.packets import ICMP_ERRORS, TCP_ACK, TCP_FIN, TCP_PSH, TCP_RST, TCP_SYN  # noqa: F401
