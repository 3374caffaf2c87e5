#!/usr/bin/env bash
# The docs-page test drives a real headless Chromium; install Debian's package when none is present.
set -euo pipefail
for name in chromium chromium-browser google-chrome; do
    if command -v "$name" >/dev/null 2>&1; then exit 0; fi
done
if [ -n "${CHROMIUM:-}" ] && [ -x "$CHROMIUM" ]; then exit 0; fi
echo "installing Chromium (Debian package) for the docs-page test" >&2
sudo=""
if [ "$(id -u)" != 0 ]; then sudo="sudo"; fi
$sudo apt-get install -y -qq chromium >/dev/null 2>&1 || {
    $sudo apt-get update -qq >/dev/null && $sudo apt-get install -y -qq chromium >/dev/null
}
