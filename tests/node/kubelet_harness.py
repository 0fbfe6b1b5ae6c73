"""The node tier's handle on two registered nodes with a kubelet stand-in each (made by the
`kubelets` fixture in conftest.py): start, stop (SIGTERM) or kill (SIGKILL) a node's kubelet."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from stockade.sandbox.node.supervise import start_kubelets
from stockade.sandbox.processes import Child
from stockade.sandbox.topology import Topology


@dataclass
class Node:
    """A two-node topology with its Nodes registered and one kubelet stand-in per node."""

    topology: Topology
    state_dir: Path
    topology_file: Path
    kubeconfig: Path
    plugins: Path
    kubelets: dict[str, Child]

    def start(self, node: str) -> None:
        (child,) = start_kubelets(
            self.state_dir,
            self.kubeconfig,
            self.topology_file,
            [node],
            self.plugins,
            quiet,
            detach=False,
        )
        self.kubelets[node] = child

    def stop(self, node: str) -> None:
        """SIGTERM, as `stockade sandbox down` stops it."""
        self.kubelets.pop(node).stop(grace=30.0)

    def kill(self, node: str) -> None:
        """SIGKILL: the kubelet leaves its pods wired, as a crash would."""
        child = self.kubelets.pop(node)
        assert child.popen is not None
        child.popen.kill()
        child.popen.wait()


def quiet(_: str) -> None:
    """A progress callback that says nothing."""
