#!/usr/bin/env bash
# Online EXO: R rounds of sample -> score -> align, each round from the current policy.
#
#   bash exp/online_exp/run.sh --sft_model SFT --reward_model RM --data_name_path NAME/KIND:PATH \
#       --output_dir OUT [--rounds 3] [--num_samples 4] [--loss_type exo-rw] [--reference sft|previous] \
#       [--force [STAGE ...]] [size and training flags]
#
# Writes OUT/results.md (reward-model reward, oracle reward with --oracle, KL(pi || pi_sft) per
# round), OUT/results.json and OUT/reward_kl_per_round.png after every round; round r's policy is
# named in OUT/roundR/manifest.json. Rerunning the same command skips finished stages and resumes
# a killed one. `python exp/online_exp/online.py --help` lists the stages, every flag and which
# rounds a changed flag redoes. DEVICE_IDS picks the devices as for every launcher.
set -euo pipefail
exec python "$(dirname "$0")/online.py" "$@"
