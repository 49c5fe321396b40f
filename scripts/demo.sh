#!/usr/bin/env bash
# Set up and run the main job: conductance of six EfficientNet-Lite0 blocks on real photos.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS=demo bash scripts/setup.sh
exec .venv/bin/conductance demo "$@"
