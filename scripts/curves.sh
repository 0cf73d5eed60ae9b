# Sourced by scripts/matched_forgetting.sh, scripts/attacks.sh and scripts/robustness.sh: a curve name -> its
# --set arguments, and the TOFU forget01 setting the TOFU comparisons share.
# Curves: any method name, and SIMU with random neurons (simu_random), MLP only (simu_mlp), or both.
curve_args() {
  case $1 in
    simu_random) echo "--set unlearn.method=simu --set mask.rule=random" ;;
    simu_mlp) echo "--set unlearn.method=simu --set unlearn.train_attention=false" ;;
    simu_mlp_random) echo "--set unlearn.method=simu --set unlearn.train_attention=false --set mask.rule=random" ;;
    *) echo "--set unlearn.method=$1" ;;
  esac
}

# TOFU forget01 (2 authors, 40 items) with the first 20 retain authors; the tiny Llama trained 30 epochs;
# 40 items per split and 64 new tokens to fit the CPU budget; a 200-step budget (the checks' settings,
# eval_every and stop_refine, are each script's).
TOFU_FORGET01_ARGS=(--set data.benchmark=tofu --set data.split=forget01 --set data.source=../shared/data/tofu
                    --set data.retain_authors=20 --set model.max_length=160 --set model.finetune.epochs=30
                    --set unlearn.epochs=20 --set eval.max_items=40 --set eval.max_new_tokens=64)
