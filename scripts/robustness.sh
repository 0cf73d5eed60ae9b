#!/usr/bin/env bash
# Reproduces docs/results.md, "Is it really forgotten?": the relearning attack on each method, and
# sequential deletion requests, on the testbed preset (data/configs/mlp_localised.yaml).
#   scripts/robustness.sh                   # both parts
#   PART=relearn scripts/robustness.sh      # relearning attack on models stopped at the reference's level
#   PART=requests scripts/robustness.sh     # 4 sequential requests of one forget author each, each stopped at the level
#   PART=relearn_tofu scripts/robustness.sh # relearning on TOFU forget01's stopped models (not part of `all`)
# Relearning: each method at its best lr of the matched-forgetting sweep (scripts/matched_forgetting.sh,
# the highest utility among the lrs where every reading matched), stopped at the retain reference's
# forget probability (unlearn.stop_at), 3 targets x 3 seeds: the attacked models forgot equally much.
# The unlearning stages are the sweep's (cached). The knockout check is off: it is not what is measured.
set -euo pipefail
cd "$(dirname "$0")/.."
SIMU=${SIMU:-.venv/bin/simu}
OUT=${OUT:-results/robustness}
PART=${PART:-all}
PARALLEL=${PARALLEL:-2}
SEEDS=${SEEDS:-3}
TARGETS=${TARGETS:-3}
RELEARN_DATA=${RELEARN_DATA:-forget_half}   # forget_half,retain_only for the benign attack too
# method:lr, each method's best lr at the reference's forget probability (docs/results.md).
METHODS=${METHODS:-fo_graddiff:1.2e-4 so_graddiff:5e-5 simu:1.2e-4 simu-random:1.2e-4 simu-mlp:3e-3 simu-mlp-random:6e-3 npo:1e-4 simnpo:2.5e-3}
COMMON=(--config data/configs/mlp_localised.yaml --set eval.max_items=100 --set knockout.enabled=false
        --seeds "$SEEDS" --max-parallel "$PARALLEL")

method_args() {  # name -> the --set arguments of that curve
  case $1 in
    simu-random) echo "--set unlearn.method=simu --set mask.rule=random" ;;
    simu-mlp) echo "--set unlearn.method=simu --set unlearn.train_attention=false" ;;
    simu-mlp-random) echo "--set unlearn.method=simu --set unlearn.train_attention=false --set mask.rule=random" ;;
    *) echo "--set unlearn.method=$1" ;;
  esac
}

if [[ $PART == all || $PART == relearn ]]; then
  for entry in $METHODS; do
    name=${entry%%:*} lr=${entry##*:}
    # shellcheck disable=SC2046
    $SIMU ablate "${COMMON[@]}" $(method_args "$name") --grid unlearn.lr="$lr" --set relearn.enabled=true \
      --targets "$TARGETS" --set unlearn.stop_at='forget_prob<=reference' --set unlearn.epochs=20 \
      --grid relearn.data="$RELEARN_DATA" --set run.results=$OUT/relearn
  done
  $SIMU report --results $OUT/relearn
fi

# Sequential requests, stopped: 4 requests of one forget author (10 items) each; every request stops at
# the retain reference's forget probability on its own items (unlearn.stop_at), so every request forgets
# as much as the reference, at each method's best lr of the one-shot matched sweep (the relearn part's
# METHODS); 3 targets x 3 seeds. A budget of 40 epochs per request (120 steps on 10 items at batch 4) so
# that the level, not the budget, ends each request; a request that overshoots or never reaches the
# level is counted as not matched in the report. Checks every 2 steps: with a check every 10 steps (the
# one-shot runs' setting; REQUEST_EVAL_EVERY=10 REQUEST_OUT=results/robustness/requests-every10) 75 of 144
# requests jumped past their level by more than 10 % between two checks (2 more started at it).
# TOFU forget01 (docs/results.md, "Relearning attack on TOFU"): the stopped models of the refined TOFU sweep
# (scripts/matched_forgetting.sh with OUT=results/matched-refined TOFU_EVAL_EVERY=2 TOFU_STOP_REFINE=6), each
# curve at its best lr by retain probability there (model utility is at its floor on TOFU's tiny model), served
# from the store. The attack's lr is set to the testbed's 1e-3: TOFU's default 1e-5 is for 7B models and does not
# move this tiny model (trained at 3e-3) in 10 steps.
TOFU_METHODS=${TOFU_METHODS:-fo_graddiff:1e-4 so_graddiff:7e-5 simu:1.7e-4 simu-random:1.7e-4 simu-mlp:7e-4 simu-mlp-random:1e-3}
# shellcheck source=scripts/curves.sh
source scripts/curves.sh
TOFU_ARGS=("${TOFU_FORGET01_ARGS[@]}" --set unlearn.eval_every=2 --set unlearn.stop_refine=6 --set relearn.lr=1e-3)
if [[ $PART == relearn_tofu ]]; then
  for entry in $TOFU_METHODS; do
    name=${entry%%:*} lr=${entry##*:}
    # shellcheck disable=SC2046
    $SIMU ablate --seeds "$SEEDS" --max-parallel "$PARALLEL" --targets "$TARGETS" "${TOFU_ARGS[@]}" \
      $(method_args "$name") --grid unlearn.lr="$lr" --set relearn.enabled=true \
      --set unlearn.stop_at='forget_prob<=reference' --grid relearn.data="$RELEARN_DATA" --set run.results=$OUT/relearn-tofu
  done
  $SIMU report --results $OUT/relearn-tofu
fi

REQUEST_METHODS=${REQUEST_METHODS:-fo_graddiff:1.2e-4 so_graddiff:5e-5 simu:1.2e-4 simu-random:1.2e-4}
REQUEST_EPOCHS=${REQUEST_EPOCHS:-40}
REQUEST_EVAL_EVERY=${REQUEST_EVAL_EVERY:-2}
REQUEST_OUT=${REQUEST_OUT:-$OUT/requests}
if [[ $PART == all || $PART == requests ]]; then
  for entry in $REQUEST_METHODS; do
    name=${entry%%:*} lr=${entry##*:}
    # shellcheck disable=SC2046
    $SIMU ablate "${COMMON[@]}" $(method_args "$name") --grid unlearn.lr="$lr" --set data.requests=4 \
      --targets "$TARGETS" --set unlearn.stop_at='forget_prob<=reference' --set unlearn.epochs="$REQUEST_EPOCHS" \
      --set unlearn.eval_every="$REQUEST_EVAL_EVERY" --set run.results="$REQUEST_OUT"
  done
  $SIMU report --results "$REQUEST_OUT"
fi
