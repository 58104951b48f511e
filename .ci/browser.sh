#!/usr/bin/env bash
# Give a fresh Debian machine a headless Chromium (run as root); idempotent. The report test
# (tests/pipeline/test_report.py) renders report.html in it; without one it skips, or fails under CI=true.
set -euo pipefail

for exe in chromium chromium-browser google-chrome; do
    if command -v "$exe" >/dev/null 2>&1; then
        echo "browser.sh: $("$exe" --version 2>/dev/null | tail -n 1)"
        exit 0
    fi
done
echo "browser.sh: installing chromium"
apt-get update -qq
# fonts-dejavu-core: the page's text needs a font; a bare image may have none
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
chromium --version
