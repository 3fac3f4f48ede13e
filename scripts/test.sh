#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the whole test suite on the CPU.
# The browser tests of `sdfsmis serve` drive Debian's Chromium (never a downloaded browser): it is
# installed here when missing and this user may run apt-get; otherwise those tests skip, saying why.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1; then
  APT=""
  if [ "$(id -u)" = 0 ]; then APT="apt-get"; elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then APT="sudo -n apt-get"; fi
  if [ -n "$APT" ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing Debian's chromium for the browser tests"
    { $APT install -y -q --no-install-recommends chromium >/dev/null 2>&1 \
      || { $APT update -q >/dev/null 2>&1 && $APT install -y -q --no-install-recommends chromium >/dev/null; }; } \
      || echo "could not install chromium: the browser tests will be skipped" >&2
  else
    echo "chromium is missing and apt-get needs root: the browser tests will be skipped" >&2
  fi
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} HF_HUB_OFFLINE=1
exec .venv/bin/python -m pytest -n 2 -q "$@"
