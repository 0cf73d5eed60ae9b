# Sourced by scripts/matched_forgetting.sh and scripts/attacks.sh: a curve name -> its --set arguments.
# Curves: any method name, and SIMU with random neurons (simu_random), MLP only (simu_mlp), or both.
curve_args() {
  case $1 in
    simu_random) echo "--set unlearn.method=simu --set mask.rule=random" ;;
    simu_mlp) echo "--set unlearn.method=simu --set unlearn.train_attention=false" ;;
    simu_mlp_random) echo "--set unlearn.method=simu --set unlearn.train_attention=false --set mask.rule=random" ;;
    *) echo "--set unlearn.method=$1" ;;
  esac
}
