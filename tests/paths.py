"""Where the tests find the repository and the shared conformance case files.

The case files live in `shared/conformance/` beside the repository (as on a developer machine and
in CI); `$STOCKADE_CONFORMANCE_DIR` points elsewhere.
"""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFORMANCE = Path(
    os.environ.get("STOCKADE_CONFORMANCE_DIR", ROOT.parent / "shared" / "conformance")
)
