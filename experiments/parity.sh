#!/usr/bin/env bash
# Behaviour check for refactors: one shared cold start on the smoke config (200 SFT steps, long enough that
# rewards differ within groups), then RL arms from it with the same seed. Run on two commits, then compare:
#   bash experiments/parity.sh /tmp/before   (on the old commit)
#   bash experiments/parity.sh /tmp/after    (on the new one)
#   python experiments/compare_runs.py /tmp/before /tmp/after
set -euo pipefail
out=$1; mkdir -p "$out"; cd "$(dirname "$0")/.."
common="--config.mesh.num_devices=1 --config.sft.eval_every=100 --config.sft.lr=3e-3 --config.rl.max_new_tokens=40
        --config.rl.steps=4 --config.data.sft_examples=256"
python -m rftjax.train --config configs/smoke.py --workdir "$out/cold" $common --config.sft.max_steps=200 \
  --config.rl.enabled=False > "$out/cold.log" 2>&1
run() { name=$1; cfg=$2; shift 2; python -m rftjax.train --config "$cfg" --workdir "$out/$name" $common \
  --config.rl.init_from_sft="$out/cold" "$@" > "$out/$name.log" 2>&1; }
run grpo_ds configs/smoke.py --config.rl.dynamic_sampling=True --config.rl.gen_prompts_per_round=4 &
run ppo configs/smoke.py:ppo
wait
run dapo configs/smoke.py:dapo &
run reinforce_pp configs/smoke.py:reinforce_pp
wait
python experiments/parity_qwen.py "$out" > "$out/qwen_grpo.log" 2>&1
