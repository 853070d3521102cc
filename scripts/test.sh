#!/usr/bin/env bash
# The README's test command: install, then the whole suite (tiny-model logic tests + embedded-model integration).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export HF_HUB_OFFLINE=1 WANDB_MODE=offline TQDM_DISABLE=1
.venv/bin/python -m pytest -q -p no:cacheprovider --durations=15 "$@"
