#!/usr/bin/env bash
# Debian packages the reproduction and the tests use: real Fashion-MNIST (dataset-fashion-mnist) and a
# real headless browser for the report test (chromium, chromium-driver). Installs only what is missing;
# needs apt-get and root (or sudo). Exit status 0 even when it cannot install, unless STRICT=1.
set -uo pipefail
wanted=()
[ -d /usr/share/datasets/fashion-mnist ] || wanted+=(dataset-fashion-mnist)
if [ "${WITH_BROWSER:-1}" = "1" ]; then
    command -v chromium >/dev/null 2>&1 || wanted+=(chromium)
    command -v chromedriver >/dev/null 2>&1 || wanted+=(chromium-driver)
fi
[ ${#wanted[@]} -eq 0 ] && exit 0
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then SUDO="sudo -n"; fi
fi
if command -v apt-get >/dev/null 2>&1 && { [ "$(id -u)" -eq 0 ] || [ -n "$SUDO" ]; }; then
    echo "installing Debian packages: ${wanted[*]}"
    if $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq \
            --no-install-recommends "${wanted[@]}" >/dev/null; then
        exit 0
    fi
fi
echo "note: could not install ${wanted[*]} (needs apt-get and root); the Fashion-MNIST experiment and the" \
     "browser test are skipped without them" >&2
[ "${STRICT:-0}" = "1" ] && exit 1
exit 0
