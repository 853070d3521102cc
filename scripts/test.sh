#!/usr/bin/env bash
# The README's test command: install, then the whole suite (tiny-model logic tests + embedded-model integration).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export HF_HUB_OFFLINE=1 WANDB_MODE=offline TQDM_DISABLE=1
# two workers: much of a Dagster run is single-threaded Python, so the second core would idle under one worker;
# worksteal keeps the long chain tests from queueing behind each other on one worker
.venv/bin/python -m pytest -q -p no:cacheprovider --durations=15 -n 2 --dist worksteal "$@"
