"""`stockade cni-install`: put stockade-cni on a node and chain it into the primary CNI network.

The agent DaemonSet runs it as a sidecar with the host's CNI directories mounted: it copies the
plugin binary into the CNI binary directory (atomically: a runtime never executes a half-written
file), writes `00-stockade.conflist` (`stockade.runtime.cnichain`), then re-checks the primary's
file every `--watch` seconds and rewrites the chained list when the primary changed. With
`--remove-on-exit` (the chart sets it) it removes the chained list and the binary when it is
stopped (SIGTERM: the DaemonSet's pod is deleted, as on `helm uninstall`), so a node without
stockade never fails pod creation on a plugin that cannot reach its agent.
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from pathlib import Path
from typing import Any

from stockade.runtime import cnichain

log = logging.getLogger(__name__)


def remove(conf_dir: Path, bin_dir: Path) -> None:
    cnichain.uninstall(conf_dir)
    cnichain.remove_binary(bin_dir)


def run(args: argparse.Namespace) -> int:
    settings = cnichain.PluginSettings(socket=str(args.socket), fail_open=args.fail_open)
    if args.uninstall:
        remove(args.conf_dir, args.bin_dir)
        return 0
    cnichain.install_binary(args.binary, args.bin_dir)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        while True:
            try:
                done = cnichain.sync(args.conf_dir, settings)
                if done != "unchanged":
                    log.info("chained configuration in %s: %s", args.conf_dir, done)
            except (OSError, cnichain.ChainError) as exc:
                log.warning("cannot chain stockade-cni: %s", exc)
                if not args.watch:
                    return 1
            if not args.watch or stop.wait(args.watch):
                break
    finally:
        if args.watch and args.remove_on_exit:
            remove(args.conf_dir, args.bin_dir)
            log.info("removed stockade-cni and its chained configuration")
    return 0


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "cni-install",
        help="install stockade-cni and chain it into the node's CNI network",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--conf-dir", type=Path, default=Path("/etc/cni/net.d"))
    p.add_argument("--bin-dir", type=Path, default=Path("/opt/cni/bin"))
    p.add_argument(
        "--binary",
        type=Path,
        default=Path("/opt/stockade/bin/stockade-cni"),
        help="the plugin binary to install",
    )
    p.add_argument("--socket", type=Path, default=Path("/run/stockade/cni.sock"))
    p.add_argument(
        "--fail-open",
        action="store_true",
        help="pods start (unenforced until the agent is back) when the agent is unreachable",
    )
    p.add_argument(
        "--watch",
        type=float,
        default=0.0,
        help="keep running, re-chaining every this many seconds (0: once)",
    )
    p.add_argument("--remove-on-exit", action="store_true")
    p.add_argument("--uninstall", action="store_true", help="remove what install wrote, then exit")
    p.set_defaults(run=lambda args, progress=None: run(args))
