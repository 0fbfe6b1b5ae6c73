#!/usr/bin/env bash
# Copy the CRDs from crds/ (the single source of truth) into the Helm chart's crds/ directory.
# `make chart-crds` runs it; tests/chart/test_chart_crds.py fails when the copies drift.
# With --check it copies nothing and exits 1 when the chart's copy differs.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
src="$root/crds"
dst="$root/charts/stockade/crds"
if [[ "${1:-}" == "--check" ]]; then
  diff -r "$src" "$dst" >/dev/null || {
    echo "charts/stockade/crds differs from crds/: run hack/chart-crds.sh" >&2
    exit 1
  }
  exit 0
fi
mkdir -p "$dst"
rm -f "$dst"/*.yaml
cp "$src"/*.yaml "$dst"/
echo "copied $(ls "$src"/*.yaml | wc -l) CRDs from crds/ to charts/stockade/crds/"
