#!/usr/bin/env bash
# Issue 16's study: every RL preset x 3 seeds from shared cold starts on the main job, with the equal-time SFT
# control; and the scarce-traces setting (traces for 1-3 digits; RL and test on 1-5; OOD 6), GRPO vs control.
#
#   bash experiments/study.sh algos  [WORKDIR]     # default /tmp/study/algos
#   bash experiments/study.sh algos_continue [WORKDIR]  # its arms vs the continue control, in WORKDIR_continue
#   bash experiments/study.sh scarce [WORKDIR]     # default /tmp/study/scarce
#   ADOPT="0=runs/digits_seed0 2=runs/digits_seed2" bash experiments/study.sh algos   # reuse those cold starts
#
# Issue 34's study (the same budgets; bfloat16 compute, where the sampler and the trainer disagree): GRPO against
# GRPO + NoisyRollout at equal rollouts per group (4 clean + 4 noisy), and GRPO with rollout correction (TIS: token,
# truncate at 2, verl's default; MIS: sequence, mask outside [0, 3], TRL's default).
#   bash experiments/study.sh noisy_corr [WORKDIR]     # the main job, default /tmp/study/noisy_corr
#   bash experiments/study.sh noisy_scarce [WORKDIR]   # scarce traces, GRPO vs NoisyRollout, /tmp/study/noisy_scarce
# NoisyRollout anneals over the 30 steps (decay_mid_step 15: the paper's 40 is past the end of so short a run).
#
# Budget (sized for one 2-core CPU): step budgets instead of the main job's time budgets, so that a machine shared
# with other work changes only the wall time (the cold start runs its 560 steps or stops by patience; RL 30 steps
# instead of ~65 in 8 minutes); an evaluation at RL step 15 (200 problems) and at the end (500 test / 300 OOD), with
# pass@k over 16 samples of 50 problems. Rerun the same command to resume; results in WORKDIR/sweep_results.md.
# The algorithm study's control restarts the SFT schedule (rl.control_schedule=restart, the only design when it ran;
# algos_continue adds the continue control to the same arms);
# the scarce study's continues the cold start's annealed schedule (continue, the default since).
set -euo pipefail
cd "$(dirname "$0")/.."
OV=(--config.sft.max_seconds=0 --config.rl.max_seconds=0 --config.rl.steps=30 --config.eval.every=15
    --config.eval.pass_n=16 --config.eval.pass_problems=50 --config.log.progress=False)
NOISY=noisy:rl.noisy_rollout.kind=gaussian,rl.noisy_rollout.decay_mid_step=15
case "${1:-}" in
  algos)
    W=${2:-/tmp/study/algos}
    for pair in ${ADOPT:-}; do
      s=${pair%%=*}
      [ -e "$W/cold_start/seed$s/summary.json" ] || python experiments/adopt_cold_start.py \
        --config configs/digits_grpo.py --workdir "$W/cold_start/seed$s" --source "${pair#*=}" --config.seed="$s" "${OV[@]}"
    done
    python -m rftjax.studies.sweep --config configs/digits_grpo.py --workdir "$W" \
      --grid rl.algorithm=grpo,dr_grpo,dapo,gspo,rloo,reinforce_pp,ppo --seeds 0,2,1 --control \
      --config.rl.control_schedule=restart "${OV[@]}" ;;
  algos_continue)  # the algorithm study's arms against the continue control: hard-linked copies of its cold
                   # starts and arms (finished, so only read) in WORKDIR_continue, then 3 controls of the same budgets
    W=${2:-/tmp/study/algos}
    mkdir -p "${W}_continue"
    for d in "$W"/cold_start "$W"/algorithm=*; do
      [ -e "${W}_continue/$(basename "$d")" ] || cp -al "$d" "${W}_continue/"; done
    python -m rftjax.studies.sweep --config configs/digits_grpo.py --workdir "${W}_continue" \
      --grid rl.algorithm=grpo,dr_grpo,dapo,gspo,rloo,reinforce_pp,ppo --seeds 0,2,1 --control \
      --config.rl.control_schedule=continue "${OV[@]}" ;;
  scarce)
    W=${2:-/tmp/study/scarce}
    python -m rftjax.studies.sweep --config configs/digits_grpo.py:scarce --workdir "$W" --grid rl.algorithm=grpo \
      --seeds 0,1,2 --control "${OV[@]}" ;;
  noisy_corr)
    W=${2:-/tmp/study/noisy_corr}
    python -m rftjax.studies.sweep --config configs/digits_grpo.py --workdir "$W" --seeds 0,1,2 \
      --arm grpo --arm "$NOISY" --arm tis:rl.algo.rollout_correction=token \
      --arm mis:rl.algo.rollout_correction=sequence,rl.algo.rollout_correction_mode=mask,rl.algo.rollout_correction_min=0,rl.algo.rollout_correction_max=3 \
      --config.model.dtype=bfloat16 "${OV[@]}" ;;
  noisy_scarce)
    W=${2:-/tmp/study/noisy_scarce}
    python -m rftjax.studies.sweep --config configs/digits_grpo.py:scarce --workdir "$W" --seeds 0,1,2 \
      --arm grpo --arm "$NOISY" --config.model.dtype=bfloat16 "${OV[@]}" ;;
  collect)  # copy a finished study's results and run logs (no checkpoints) into experiments/results/study_NAME/
    W=${2:?give the study directory}
    D=experiments/results/study_$(basename "$W")
    (cd "$W" && find . -maxdepth 3 \( -name 'sweep*' -o -name summary.json -o -name eval.jsonl -o -name metrics.jsonl \
      -o -name curves.png \) -not -path '*/tensorboard/*') | while read -r f; do
      mkdir -p "$D/$(dirname "$f")" && cp "$W/$f" "$D/$f"; done
    gzip -nf "$D"/*/seed*/metrics.jsonl ;;
  *) echo "usage: bash experiments/study.sh algos|algos_continue|scarce|noisy_corr|noisy_scarce [WORKDIR] | collect WORKDIR" >&2
     exit 2 ;;
esac
