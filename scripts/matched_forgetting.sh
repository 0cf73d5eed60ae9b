#!/usr/bin/env bash
# Reproduces docs/results.md, "Does choosing critical neurons help?": FO-GradDiff, SO-GradDiff,
# SIMU (critical neurons), SIMU (random neurons, same per-layer counts), SIMU (MLP only) and
# SIMU (MLP only, random neurons), each over the same lr grid and 3 seeds, compared at matched
# forgetting by `simu report`; plus the knockout check of the masks.
#   scripts/matched_forgetting.sh                 # both parts
#   PART=testbed scripts/matched_forgetting.sh    # the mlp_localised preset (built-in benchmark)
#   PART=tofu scripts/matched_forgetting.sh       # TOFU forget01, tiny model trained in the run
# Every point is a `simu ablate` point; stages shared by points (data, target, reference,
# attribution, mask, knockout) are computed once and served from the store afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."
SIMU=${SIMU:-.venv/bin/simu}
OUT=${OUT:-results/matched}
PART=${PART:-all}
PARALLEL=${PARALLEL:-2}
# The same lr grid for every method: log-spaced from 1e-4 to 3e-2, denser where the methods reach
# the retain reference's forgetting (2e-4 to 5e-4 on the testbed; TOFU's grid stops at 1e-2).
LRS=${LRS:-1e-4,2e-4,3e-4,5e-4,1e-3,3e-3,1e-2,3e-2}
TOFU_LRS=${TOFU_LRS:-1e-4,2e-4,5e-4,1e-3,3e-3,1e-2}
SEEDS=${SEEDS:-3}
MLP_ONLY_RULES=${MLP_ONLY_RULES:-layer_relative,random}   # SIMU (MLP only) with critical, and random, neurons

sweep() {  # name, lr grid, extra arguments for every ablate call...
  local name=$1 lrs=$2; shift 2
  local out=$OUT/$name
  local common=(--seeds "$SEEDS" --max-parallel "$PARALLEL" --grid unlearn.lr=$lrs --set run.results=$out "$@")
  $SIMU ablate --grid unlearn.method=fo_graddiff,so_graddiff,simu "${common[@]}"
  $SIMU ablate --set unlearn.method=simu --grid mask.rule=random "${common[@]}"
  $SIMU ablate --set unlearn.method=simu --set unlearn.train_attention=false --grid mask.rule=$MLP_ONLY_RULES \
    "${common[@]}"
  $SIMU report --results "$out"
}

if [[ $PART == all || $PART == testbed ]]; then
  sweep testbed "$LRS" --config data/configs/mlp_localised.yaml --set eval.max_items=100
  # The contrastive score (forget minus retain attribution) on the same target, for comparison.
  $SIMU ablate --config data/configs/mlp_localised.yaml --set mask.score=contrastive --set unlearn.method=simu \
    --grid unlearn.lr=$LRS --seeds "$SEEDS" --max-parallel "$PARALLEL" --set run.results=$OUT/testbed --set eval.max_items=100
  $SIMU report --results $OUT/testbed
fi

if [[ $PART == all || $PART == tofu ]]; then
  # TOFU evaluates 40 items per split (forget01 has 40) to fit the CPU budget, and runs SIMU (MLP only)
  # with the critical neurons only.
  MLP_ONLY_RULES=layer_relative sweep tofu "$TOFU_LRS" --set data.benchmark=tofu --set data.split=forget01 --set data.source=../shared/data/tofu \
    --set data.retain_authors=20 --set model.max_length=160 --set model.finetune.epochs=30 \
    --set eval.max_items=40 --set eval.max_new_tokens=64
fi
