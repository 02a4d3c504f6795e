#!/usr/bin/env bash
# Install Debian's Chromium, which tests/test_web.py drives headless over the DevTools protocol.
# Safe to run again: does nothing when `chromium` is already on PATH.
set -euo pipefail

if command -v chromium >/dev/null 2>&1; then
    echo "install_chromium: $(chromium --version 2>/dev/null || echo chromium) already installed"
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install_chromium: no apt-get here; install Chromium yourself (tests/test_web.py needs" \
        "a 'chromium' on PATH)" >&2
    exit 1
fi

SUDO=()
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        SUDO=(sudo -n)
    else
        echo "install_chromium: chromium is missing and installing it needs root;" \
            "run 'sudo apt-get install -y chromium' (or this script as root)" >&2
        exit 1
    fi
fi

export DEBIAN_FRONTEND=noninteractive
# Refresh the package lists only when apt does not know the package yet.
if ! apt-cache show chromium >/dev/null 2>&1 || [ -z "$(apt-cache policy chromium |
    awk '/Candidate:/ {print $2}' | grep -v '(none)')" ]; then
    "${SUDO[@]}" apt-get update -q
fi
"${SUDO[@]}" apt-get install -y -q --no-install-recommends chromium
if ! command -v chromium >/dev/null 2>&1; then
    echo "install_chromium: apt-get finished but 'chromium' is still not on PATH" >&2
    exit 1
fi
echo "install_chromium: $(chromium --version) installed"
