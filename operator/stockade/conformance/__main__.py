"""`python -m stockade.conformance run FILE --engine reference`: the runner without the full CLI."""

from __future__ import annotations

from stockade.conformance.command import main

if __name__ == "__main__":
    raise SystemExit(main())
