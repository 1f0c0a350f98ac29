#!/usr/bin/env bash
# Install Debian's Chromium and chromedriver for the playground's browser tests
# (tests/test_playground.py) when they are missing. Nothing else is downloaded at test time.
set -euo pipefail
if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then
  exit 0
fi
if ! command -v apt-get >/dev/null; then
  echo "install_browser.sh: no apt-get here; install chromium and chromedriver at /usr/bin yourself" >&2
  exit 1
fi
sudo=""
if [ "$(id -u)" -ne 0 ]; then
  sudo="sudo"
fi
echo "installing chromium and chromium-driver (apt) for the playground tests" >&2
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
  chromium chromium-driver fonts-liberation >/dev/null
