#!/usr/bin/env bash
# Set up and run the test suite (including the slow tests on real pretrained EfficientNet-Lite0).
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS=demo,test bash scripts/setup.sh
exec .venv/bin/python -m pytest -q "$@"
