#!/usr/bin/env bash
# Reproduces docs/results.md, "Does choosing critical neurons help?": every method stopped at a
# forgetting level (unlearn.stop_at), over its own lr grid, on several independently trained targets
# (model.finetune.seed, `--targets`) and unlearning seeds (`--seeds`), compared by `simu report`
# (measured forget value of every reading, matched / not matched, best lr, paired differences).
#   scripts/matched_forgetting.sh                       # every part below
#   PART=testbed scripts/matched_forgetting.sh          # the mlp_localised preset (built-in benchmark)
#   PART=tofu scripts/matched_forgetting.sh             # TOFU forget01, tiny model trained in the run
#   LEVELS='forget_prob<=reference' PART=testbed ...    # one level only
#   OUT=results/matched-refined PART=tofu_npo_probe ...  # NPO and SimNPO at TOFU's reference forget probability (not in all)
# Curves: FO-GradDiff, SO-GradDiff, NPO, SimNPO, SIMU, SIMU with random neurons, SIMU MLP only with
# critical and with random neurons. Each level writes its own results folder and report
# (results/matched/<part>/<level>/report/report.md). Stages shared by points (data, targets, references,
# attribution, masks, knockout) are computed once and served from the store afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."
SIMU=${SIMU:-.venv/bin/simu}
OUT=${OUT:-results/matched}
PART=${PART:-all}
PARALLEL=${PARALLEL:-2}
TARGETS=${TARGETS:-3}
SEEDS=${SEEDS:-3}
LEVELS=${LEVELS:-forget_prob<=reference forget_quality>=0.05}
# Per curve, four lrs that reach the level within the budget (20 epochs = 200 steps on the testbed), chosen
# on target 0, seed 0 from per-step trajectories at one lr (docs/results.md, "The lr grids"): the smallest
# lr reaches the reference's forget probability late in the budget, where one step moves it by a few per
# cent; the largest reaches it within about 40 steps. Overrides: LR_<curve>.
declare -A TESTBED_LRS=(
  [fo_graddiff]=${LR_fo_graddiff:-1.2e-4,1.5e-4,2e-4,2.5e-4}
  [so_graddiff]=${LR_so_graddiff:-5e-5,6e-5,8e-5,1e-4}
  [npo]=${LR_npo:-1e-4,1.3e-4,1.7e-4,2.2e-4}
  [simnpo]=${LR_simnpo:-1.5e-3,2e-3,2.5e-3,3e-3}
  [simu]=${LR_simu:-1.2e-4,1.5e-4,2e-4,2.5e-4}
  [simu_random]=${LR_simu_random:-1.2e-4,1.5e-4,2e-4,2.5e-4}
  [simu_mlp]=${LR_simu_mlp:-3e-3,4e-3,5e-3,6.5e-3}
  [simu_mlp_random]=${LR_simu_mlp_random:-5e-3,6e-3,8e-3,1e-2}
)

# shellcheck source=scripts/curves.sh
source scripts/curves.sh

sweep() {  # part name, lr table name, extra arguments for every ablate call...
  local name=$1 table=$2; shift 2
  local -n lrs=$table
  for level in $LEVELS; do
    local out=$OUT/$name/${level//[<>=]/_}
    for curve in ${CURVES:-fo_graddiff so_graddiff simu simu_random simu_mlp simu_mlp_random npo simnpo}; do
      # shellcheck disable=SC2046
      $SIMU ablate --targets "$TARGETS" --seeds "$SEEDS" --max-parallel "$PARALLEL" $(curve_args "$curve") \
        --grid unlearn.lr="${lrs[$curve]}" --set unlearn.stop_at="$level" --set run.results="$out" "$@"
    done
    $SIMU report --results "$out"
  done
}

if [[ $PART == all || $PART == testbed ]]; then
  sweep testbed TESTBED_LRS --config data/configs/mlp_localised.yaml --set unlearn.epochs=20 --set eval.max_items=100
fi

if [[ $PART == all || $PART == tofu ]]; then
  # TOFU forget01 (2 authors, 40 items) with the first 20 retain authors; the tiny Llama trained 30 epochs;
  # 40 items per split and 64 new tokens to fit the CPU budget; the same 200-step budget as the testbed.
  # Grids from the earlier fixed-budget TOFU sweep (docs/results.md: FO-GradDiff and SIMU reached the
  # reference's forget probability at about 3.3e-4 with a 50-step budget, SO-GradDiff at 2.2e-4), scaled to
  # the 200-step budget; the two MLP-only grids were checked on target 0, seed 0 (two lrs each) before their
  # sweep. NPO and SimNPO never reach the reference's forget probability on TOFU (their losses saturate at a
  # forget probability of 0.06-0.14; lrs up to 3e-3 and 1e-2 probed, docs/results.md): their grids here are the
  # testbed's and only the forget-quality level was run for them, at lrs set by TOFU_LR_<curve>. TOFU_EVAL_EVERY (default 10): the forget-quality
  # level was run with 2 (with 40 items forget quality takes steps of one KS statistic 1/40 apart, and only one
  # attainable value, 0.0541, lies within 10 % above 0.05: a check every 10 steps jumps over it).
  declare -A TOFU_LRS=(
    [fo_graddiff]=${TOFU_LR_fo_graddiff:-1e-4,1.3e-4,1.7e-4,2.2e-4}
    [so_graddiff]=${TOFU_LR_so_graddiff:-7e-5,9e-5,1.2e-4,1.5e-4}
    [npo]=${TOFU_LR_npo:-1e-4,1.3e-4,1.7e-4,2.2e-4}
    [simnpo]=${TOFU_LR_simnpo:-1.5e-3,2e-3,2.5e-3,3e-3}
    [simu]=${TOFU_LR_simu:-1e-4,1.3e-4,1.7e-4,2.2e-4}
    [simu_random]=${TOFU_LR_simu_random:-1e-4,1.3e-4,1.7e-4,2.2e-4}
    [simu_mlp]=${TOFU_LR_simu_mlp:-7e-4,1e-3,1.5e-3,2e-3}
    [simu_mlp_random]=${TOFU_LR_simu_mlp_random:-1e-3,1.5e-3,2e-3,3e-3}
  )
  sweep tofu TOFU_LRS "${TOFU_FORGET01_ARGS[@]}" \
    --set unlearn.eval_every="${TOFU_EVAL_EVERY:-10}" --set unlearn.stop_refine="${TOFU_STOP_REFINE:-0}"
fi

if [[ $PART == tofu_npo_probe ]]; then
  # NPO and SimNPO at TOFU's reference forget probability (docs/results.md): target 0, seed 0 over a widening lr
  # range, then the largest lr on all three targets; every run ends "not reached" (their losses saturate).
  for entry in npo:1.5e-4,3e-4,1e-3,3e-3 simnpo:1.5e-3,3e-3,1e-2 npo:3e-3:3 simnpo:1e-2:3; do
    IFS=: read -r curve lrs targets <<< "$entry"
    $SIMU ablate --targets "${targets:-1}" --seeds 1 --max-parallel "$PARALLEL" --set unlearn.method="$curve" \
      --grid unlearn.lr="$lrs" --set unlearn.stop_at='forget_prob<=reference' --set run.results="$OUT/tofu-probe" \
      "${TOFU_FORGET01_ARGS[@]}" --set unlearn.eval_every=2 --set unlearn.stop_refine=6
  done
  $SIMU report --results "$OUT/tofu-probe"
fi
