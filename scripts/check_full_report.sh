#!/usr/bin/env bash
# The full reproduction checked in a real browser: runs `conductance reproduce all --out DIR` (25-60 min
# on 2 cores; skipped when DIR already holds a report and REUSE=1), then the browser test of every
# section at the full sizes (tests/test_report_browser.py::test_full_reproduction_report_renders_in_chromium),
# which keeps a screenshot of the page and of each section in tests/artifacts/report-full-sections/.
#
#   bash scripts/check_full_report.sh [DIR] [extra reproduce options, e.g. --weights googlenet.pth]
#
# DIR defaults to out/reproduction-full. Uses .venv (scripts/setup.sh) unless PYTHON names another
# interpreter. Exit status: the reproduction's, else pytest's.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR="${1:-out/reproduction-full}"
[ $# -gt 0 ] && shift
PYTHON="${PYTHON:-}"
if [ -z "$PYTHON" ]; then
    [ -x .venv/bin/python ] || EXTRAS=reproduce,test bash scripts/setup.sh
    PYTHON=.venv/bin/python
fi
if [ "${REUSE:-0}" = "1" ] && [ -f "$DIR/report.html" ]; then
    echo "[check_full_report] reusing $DIR/report.html"
else
    "$PYTHON" -m conductance reproduce all --out "$DIR" "$@"
fi
CONDUCTANCE_FULL_REPORT="$DIR" exec "$PYTHON" -m pytest -q -rs \
    "tests/test_report_browser.py::test_full_reproduction_report_renders_in_chromium"
