#!/usr/bin/env bash
# Reproduces docs/results.md, "Does SIMU's scope help other losses?": every loss with Sophia on all
# parameters (so_<loss>) and on SIMU's scope (simu_<loss>: attention + critical down-projection
# columns), each stopped at the retain reference's forget probability (unlearn.stop_at), on the
# testbed preset, over 3 independently trained targets (model.finetune.seed) x 3 unlearning seeds,
# compared by `simu report` (matched readings, best lr, paired differences per target and seed).
#   scripts/losses_by_scope.sh                    # every curve, both lrs of each
#   LR_INDEX=0 scripts/losses_by_scope.sh         # the first lr of each curve only
#   LOSSES='graddiff npo' scripts/losses_by_scope.sh
#   PART=tofu scripts/losses_by_scope.sh          # TOFU forget01, tiny model trained in the run (below)
# The lrs (two per curve) were chosen from a probe on target 0, seed 0 at lr 1e-4 and 3e-4 (and lower or
# higher where those ran past the level in one check or did not reach it): docs/results.md lists every
# probe reading. idk_dpo and satimp are not swept: no lr tried reached the level before model utility fell
# to 0 (the probe's table). dpo reads a user's preferred answers (unlearn.preferred_source): here the
# benchmark's first perturbed answer to each forget question (scripts/preferred_answers.py writes the file);
# its probe (5e-5, 1e-4, 2e-4, 3e-4 per scope) reached the level at 1e-4 and 2e-4, not at 5e-5 within the
# budget, and overshot at 3e-4, with both scopes.
set -euo pipefail
cd "$(dirname "$0")/.."
SIMU=${SIMU:-.venv/bin/simu}
OUT=${OUT:-results/losses/testbed}
PARALLEL=${PARALLEL:-2}
TARGETS=${TARGETS:-3}
SEEDS=${SEEDS:-3}
LOSSES=${LOSSES:-ga graddiff npo simnpo altpo dpo rmu undial wga ceu pdu}
PREFERRED=${PREFERRED:-results/losses/preferred_testbed.jsonl}
SCOPES=${SCOPES:-all simu}
declare -A LRS=(
  [ga/all]=5e-5,8e-5          [ga/simu]=7e-5,1e-4
  [graddiff/all]=6e-5,1e-4    [graddiff/simu]=1e-4,1.5e-4
  [npo/all]=6e-5,1e-4         [npo/simu]=1e-4,1.5e-4
  [simnpo/all]=2e-4,3e-4      [simnpo/simu]=1.5e-3,2e-3
  [altpo/all]=7e-5,1.5e-4     [altpo/simu]=1e-4,2e-4
  [dpo/all]=1e-4,2e-4         [dpo/simu]=1e-4,2e-4
  [rmu/all]=7e-5,1e-4         [rmu/simu]=2e-4,3e-4
  [undial/all]=7e-5,1e-4      [undial/simu]=1.5e-4,2e-4
  [wga/all]=1e-4,2e-4         [wga/simu]=2e-4,3e-4
  [ceu/all]=2e-5,4e-5         [ceu/simu]=7e-5,1e-4
  [pdu/all]=2e-5,3e-5         [pdu/simu]=5e-5,7e-5
)
# TOFU forget01 (2 authors, 40 items, the first 20 retain authors, the tiny Llama trained 30 epochs; the
# setting of scripts/matched_forgetting.sh), stopped at forget quality >= 0.05 with a check every 2 steps:
# the retain reference's forget probability (about 5e-4) cannot be stopped at within 10 % on this model (one
# step moves it by more), docs/results.md. idk_dpo reads TOFU's own "I don't know" file next to the data; dpo
# the first perturbed answer of each forget question. Lrs: the testbed's first lr of each curve, run as a
# probe on target 0, seed 0 (LR_INDEX=0 TARGETS=1 SEEDS=1); docs/results.md lists every probe reading. 12 of
# the 24 curves did not reach the level at these lrs: the 3 x 3 sweep needs larger lrs for them (not run).
declare -A TOFU_LRS=(
  [ga/all]=5e-5              [ga/simu]=7e-5
  [graddiff/all]=6e-5        [graddiff/simu]=1e-4
  [npo/all]=6e-5             [npo/simu]=1e-4
  [simnpo/all]=2e-4          [simnpo/simu]=1.5e-3
  [altpo/all]=7e-5           [altpo/simu]=1e-4
  [dpo/all]=1e-4             [dpo/simu]=1e-4
  [idk_dpo/all]=1e-4         [idk_dpo/simu]=1e-4
  [rmu/all]=7e-5             [rmu/simu]=2e-4
  [undial/all]=7e-5          [undial/simu]=1.5e-4
  [wga/all]=1e-4             [wga/simu]=2e-4
  [ceu/all]=2e-5             [ceu/simu]=7e-5
  [pdu/all]=2e-5             [pdu/simu]=5e-5
)
if [[ ${PART:-testbed} == tofu ]]; then
  OUT=${OUT_TOFU:-results/losses/tofu}
  PREFERRED=${PREFERRED_TOFU:-results/losses/preferred_tofu.jsonl}
  LOSSES=${LOSSES_TOFU:-ga graddiff npo simnpo altpo dpo idk_dpo rmu undial wga ceu pdu}
  PART_ARGS=(--set data.benchmark=tofu --set data.split=forget01 --set data.source=../shared/data/tofu
    --set data.retain_authors=20 --set model.max_length=160 --set model.finetune.epochs=30 --set eval.max_items=40
    --set eval.max_new_tokens=64 --set unlearn.eval_every=2 --set unlearn.stop_at='forget_quality>=0.05')
  PREFERRED_ARGS=(--set data.benchmark=tofu --set data.split=forget01 --set data.source=../shared/data/tofu)
  declare -n PART_LRS=TOFU_LRS
else
  PART_ARGS=(--config data/configs/mlp_localised.yaml --set eval.max_items=100
    --set unlearn.stop_at='forget_prob<=reference')
  PREFERRED_ARGS=(--config data/configs/mlp_localised.yaml)
  declare -n PART_LRS=LRS
fi
if [[ " $LOSSES " == *" dpo "* && ! -f $PREFERRED ]]; then
  .venv/bin/python scripts/preferred_answers.py "${PREFERRED_ARGS[@]}" --out "$PREFERRED"
fi
for scope in $SCOPES; do
  for loss in $LOSSES; do
    lrs=${PART_LRS[$loss/$scope]}
    if [[ -n ${LR_INDEX:-} ]]; then IFS=, read -ra all <<< "$lrs"; lrs=${all[$LR_INDEX]}; fi
    # rmu_layer 2 of the 4 layers (WMDP's 7 of 32 is beyond this model).
    $SIMU ablate "${PART_ARGS[@]}" --targets "$TARGETS" --seeds "$SEEDS" \
      --max-parallel "$PARALLEL" --set unlearn.optimizer=sophia --set unlearn.scope="$scope" \
      --set unlearn.loss="$loss" --grid unlearn.lr="$lrs" --set unlearn.epochs=20 \
      --set unlearn.rmu_layer=2 --set run.results="$OUT" \
      $( [[ $loss == dpo ]] && echo "--set unlearn.preferred_source=$PREFERRED" )
  done
done
$SIMU report --results "$OUT"
