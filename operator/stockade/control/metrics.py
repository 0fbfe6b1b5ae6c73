"""The operator's metrics in the Prometheus text format: reconcile passes, objects written,
statuses written, leadership. Served by `stockade.runtime.serve_http` from `stockade.control.app`.
"""

from __future__ import annotations

from collections.abc import Mapping


def prometheus_text(gauges: Mapping[str, float]) -> str:
    return "".join(f"{name} {value}\n" for name, value in sorted(gauges.items()))
