#!/usr/bin/env bash
# Set up and run the main job: the conductance of six EfficientNet-Lite0 blocks on real photos, then the
# quick reproduction of the paper's experiments (report in out/reproduction-quick/report.html).
# Arguments are passed to `conductance demo`; set REPRODUCE=0 to skip the reproduction.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS=reproduce bash scripts/setup.sh
.venv/bin/conductance demo "$@"
if [ "${REPRODUCE:-1}" != "0" ]; then
    .venv/bin/conductance reproduce all --quick --out out/reproduction-quick
fi
