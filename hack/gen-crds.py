#!/usr/bin/env python3
"""Write crds/*.yaml from the policy models in stockade.model (the single source of truth).

Run after changing a model: `.venv/bin/python hack/gen-crds.py`. With `--check` it writes
nothing and exits 1 when a file in crds/ differs from what the models generate (the unit test
tests/unit/test_crd_drift.py makes the same check).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from stockade.model.crd import CRD_KINDS, render_crd_yaml

CRDS = Path(__file__).resolve().parent.parent / "crds"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report drift")
    args = parser.parse_args()
    stale = []
    for kind in CRD_KINDS:
        path = CRDS / kind.filename
        text = render_crd_yaml(kind)
        current = path.read_text() if path.exists() else None
        if current == text:
            continue
        stale.append(path)
        if not args.check:
            path.write_text(text)
            print(f"wrote {path}")
    if args.check and stale:
        for path in stale:
            print(f"{path} is out of date: run hack/gen-crds.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
