#!/usr/bin/env bash
# Reproduces docs/results.md, "Is it really forgotten?": the relearning attack on each method, and
# sequential deletion requests, on the testbed preset (data/configs/mlp_localised.yaml), 3 seeds.
#   scripts/robustness.sh                   # both parts
#   PART=relearn scripts/robustness.sh      # relearning attack (forget_half and retain_only)
#   PART=requests scripts/robustness.sh     # 4 sequential requests of one forget author each
# Each method runs at the lr where it reaches the retain reference's forget probability on the
# testbed (docs/results.md, "SIMU vs the baselines at matched forgetting"), so the attack compares
# methods that forgot equally much. The knockout check is off: it is not what is measured here.
set -euo pipefail
cd "$(dirname "$0")/.."
SIMU=${SIMU:-.venv/bin/simu}
OUT=${OUT:-results/robustness}
PART=${PART:-all}
PARALLEL=${PARALLEL:-2}
SEEDS=${SEEDS:-3}
# method:lr, the lr at matched forget probability (rounded to the nearest of 1e-4, 1.2e-4, 3e-4, 7e-3).
METHODS=${METHODS:-fo_graddiff:3e-4 so_graddiff:1.2e-4 simu:3e-4 simu-random:3e-4 simu-mlp:7e-3}
COMMON=(--config data/configs/mlp_localised.yaml --set eval.max_items=100 --set knockout.enabled=false
        --seeds "$SEEDS" --max-parallel "$PARALLEL")

method_args() {  # name -> the --set arguments of that curve
  case $1 in
    simu-random) echo "--set unlearn.method=simu --set mask.rule=random" ;;
    simu-mlp) echo "--set unlearn.method=simu --set unlearn.train_attention=false" ;;
    *) echo "--set unlearn.method=$1" ;;
  esac
}

if [[ $PART == all || $PART == relearn ]]; then
  for entry in $METHODS; do
    name=${entry%%:*} lr=${entry##*:}
    # shellcheck disable=SC2046
    $SIMU ablate "${COMMON[@]}" $(method_args "$name") --set unlearn.lr="$lr" --set relearn.enabled=true \
      --grid relearn.data=forget_half,retain_only --set run.results=$OUT/relearn
  done
  $SIMU report --results $OUT/relearn
fi

# Unlearning epochs per request: 5 is the one-shot run's setting (15 steps on a request's 10 items,
# 60 in all); 17 gives every request the one-shot run's 50-step budget (51 steps).
REQUEST_EPOCHS=${REQUEST_EPOCHS:-5 17}
if [[ $PART == all || $PART == requests ]]; then
  for epochs in $REQUEST_EPOCHS; do
    for entry in $METHODS; do
      name=${entry%%:*} lr=${entry##*:}
      [[ $name == simu-random || $name == simu-mlp ]] && continue   # the three methods the issue compares
      # shellcheck disable=SC2046
      $SIMU ablate "${COMMON[@]}" $(method_args "$name") --grid unlearn.lr="$lr" --set data.requests=4 \
        --set unlearn.epochs="$epochs" --set run.results=$OUT/requests-e$epochs
    done
    $SIMU report --results $OUT/requests-e$epochs
  done
fi
