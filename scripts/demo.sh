#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the demo: segment a bundled CHAOS MRI scan from another one.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1
exec .venv/bin/sdfsmis demo "$@"
