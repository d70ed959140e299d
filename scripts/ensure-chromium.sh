#!/usr/bin/env bash
# Make sure Debian's Chromium is at /usr/bin/chromium: the inbox's browser tests drive it
# through the Python `playwright` package (never `playwright install`, whose own browser
# download is not reachable from here). Used by `make test`.
set -euo pipefail

if command -v chromium >/dev/null 2>&1 && [ -x /usr/bin/chromium ]; then
  exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  SUDO="sudo"
fi

echo "ensure-chromium: installing Debian's chromium"
export DEBIAN_FRONTEND=noninteractive
if ! $SUDO apt-get install -y chromium; then
  $SUDO apt-get update
  $SUDO apt-get install -y chromium
fi

if [ ! -x /usr/bin/chromium ]; then
  echo "ensure-chromium: /usr/bin/chromium is still missing" >&2
  exit 1
fi
