#!/usr/bin/env bash
# Reward–KL frontiers over beta and seeds for every method, compared at matched KL:
#
#   bash exp/frontier/run.sh [--workdir results/frontier] [--methods ...] [--quick] [--force [STAGE ...]]
#
# Writes WORKDIR/results.md (the matched-KL tables), results.json (every evaluated point) and
# frontier.png. `python exp/frontier/frontier.py --help` lists every flag, the grid and how to run
# it on a recipe's models. DEVICE_IDS picks the devices as for every launcher.
set -euo pipefail
exec python "$(dirname "$0")/frontier.py" "$@"
