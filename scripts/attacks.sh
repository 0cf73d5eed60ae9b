#!/usr/bin/env bash
# Reproduces docs/results.md, "Is it removed or hidden? The attack suite": every attack (quantize, paraphrase,
# in_context, logit_lens, relearn) on models stopped at the retain reference's forget probability
# (unlearn.stop_at), on the testbed preset, 3 independently trained targets (model.finetune.seed) x 3
# unlearning seeds, each curve at its best lr of the matched sweeps (docs/results.md: "SIMU vs the baselines,
# stopped at the same forgetting" and "Does SIMU's scope help other losses?"), compared by `simu report`
# (the "Attacks: removed or hidden?" section: recovery per attack, OpenUnlearning's R, Q, HM, paired
# differences of recovery over the matched readings).
#   scripts/attacks.sh                       # both parts
#   PART=methods scripts/attacks.sh          # the 8 curves of the matched comparison (72 runs)
#   PART=losses scripts/attacks.sh           # Sophia on all parameters vs SIMU's scope, 7 losses (126 runs)
#   PART=default scripts/attacks.sh          # 4 curves on the built-in default config (results/attacks/default)
# The target's and the retain reference's attacks are computed once per target and shared by every curve.
set -euo pipefail
cd "$(dirname "$0")/.."
SIMU=${SIMU:-.venv/bin/simu}
OUT=${OUT:-results/attacks/testbed}
PART=${PART:-all}
PARALLEL=${PARALLEL:-2}
TARGETS=${TARGETS:-3}
SEEDS=${SEEDS:-3}
ATTACKS='attacks=[quantize,paraphrase,in_context,logit_lens,relearn]'
COMMON=(--config data/configs/mlp_localised.yaml --targets "$TARGETS" --seeds "$SEEDS" --max-parallel "$PARALLEL"
        --set unlearn.epochs=20 --set eval.max_items=100 --set unlearn.stop_at='forget_prob<=reference'
        --set "$ATTACKS" --set run.results="$OUT")

# shellcheck source=scripts/curves.sh
source scripts/curves.sh

if [[ $PART == all || $PART == methods ]]; then
  # Best lr per curve at forget_prob<=reference (the stopped table of the matched sweep); SIMU MLP-only has no
  # lr with every reading matched there (3e-3: 5/9), its most matched lr is used.
  declare -A BEST=([fo_graddiff]=1.2e-4 [so_graddiff]=5e-5 [npo]=1e-4 [simnpo]=2.5e-3 [simu]=1.2e-4
                   [simu_random]=1.2e-4 [simu_mlp]=3e-3 [simu_mlp_random]=6e-3)
  for curve in ${CURVES:-fo_graddiff so_graddiff simu simu_random simu_mlp simu_mlp_random npo simnpo}; do
    # shellcheck disable=SC2046
    $SIMU ablate "${COMMON[@]}" $(curve_args "$curve") --grid unlearn.lr="${BEST[$curve]}"
  done
fi

if [[ $PART == all || $PART == losses ]]; then
  # Best lr per loss and scope of the loss x scope sweep (Sophia both), for the losses whose SIMU-scope curve had a
  # matched best lr there (rmu and simnpo had none; idk_dpo and satimp never reached the level).
  declare -A LOSS_BEST=(
    [ga/all]=5e-5 [ga/simu]=7e-5 [npo/all]=6e-5 [npo/simu]=1e-4 [altpo/all]=7e-5 [altpo/simu]=1e-4
    [undial/all]=7e-5 [undial/simu]=1.5e-4 [wga/all]=1e-4 [wga/simu]=3e-4 [ceu/all]=2e-5 [ceu/simu]=7e-5
    [pdu/all]=2e-5 [pdu/simu]=5e-5)
  for loss in ${LOSSES:-npo undial ceu pdu ga altpo wga}; do
    for scope in all simu; do
      $SIMU ablate "${COMMON[@]}" --set unlearn.optimizer=sophia --set unlearn.scope="$scope" \
        --set unlearn.loss="$loss" --grid unlearn.lr="${LOSS_BEST[$loss/$scope]}"
    done
  done
fi

if [[ $PART == all || $PART == default ]]; then
  # The same on the built-in default config (not the MLP-localised testbed), four curves: the default method's
  # 2e-4 (the default run
  # reaches the reference's level at step 85 of 200) and the testbed's best lrs scaled by the same 2e-4 / 1.2e-4;
  # SIMU (and its random control) matched 4 (5) of 9 readings at 2e-4, so 1.5e-4 was added for them.
  declare -A DEFAULT_LR=([fo_graddiff]=2e-4 [so_graddiff]=8e-5 [simu]=1.5e-4,2e-4 [simu_random]=1.5e-4,2e-4)
  for curve in ${CURVES:-fo_graddiff so_graddiff simu simu_random}; do
    # shellcheck disable=SC2046
    $SIMU ablate --targets "$TARGETS" --seeds "$SEEDS" --max-parallel "$PARALLEL" --set unlearn.stop_at='forget_prob<=reference' \
      --set "$ATTACKS" --set run.results="${DEFAULT_OUT:-results/attacks/default}" $(curve_args "$curve") \
      --grid unlearn.lr="${DEFAULT_LR[$curve]}"
  done
  $SIMU report --results "${DEFAULT_OUT:-results/attacks/default}"
fi

$SIMU report --results "$OUT"
