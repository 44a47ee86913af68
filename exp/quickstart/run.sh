#!/usr/bin/env bash
# The paper's IMDB experiment in miniature, on CPU (or GPUs), through the real pipeline:
#
#   bash exp/quickstart/run.sh [--workdir results/quickstart] [--force [STAGE ...]] [size flags]
#
# Writes results/quickstart/results.md (oracle reward, KL and win rate vs SFT per checkpoint) and
# results/quickstart/reward_vs_kl.png. `python exp/quickstart/quickstart.py --help` lists the
# stages and every flag. DEVICE_IDS picks the devices as for every launcher.
set -euo pipefail
exec python "$(dirname "$0")/quickstart.py" "$@"
