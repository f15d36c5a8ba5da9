"""Reuse an existing run's cold start as a sweep's: copy its sft_checkpoint/ and SFT metrics into
SWEEP/cold_start/seed{S}, and evaluate it again with the sweep's evaluation settings (e.g. pass@k with
`--config.eval.pass_n=16`), so that the sweep skips training it.

    python experiments/adopt_cold_start.py --config configs/digits_grpo.py --workdir SWEEP/cold_start/seed0 \\
        --source runs/digits_seed0 --config.seed=0 [the sweep's other --config overrides]

The source must have been trained with the same model, data and SFT settings (the cold start a sweep would
train); its evaluation records are replaced by the new `sft_end` evaluation (same params: greedy accuracy only
differs by the sampling seed of pass@k).
"""

import dataclasses
import json
import os
import shutil

from absl import flags

from rftjax import metrics
from rftjax.checkpoint import SFT_CHECKPOINT
from rftjax.configs import run_cli
from rftjax.train import Trainer

flags.DEFINE_string("source", None, "run directory whose sft_checkpoint/ to adopt")


def main(config, workdir):
    source = os.path.abspath(flags.FLAGS.source)
    if os.path.exists(os.path.join(workdir, "summary.json")):
        raise SystemExit(f"{workdir} already holds a finished run")
    config.rl.init_from_sft, config.rl.enabled = source, False
    trainer = Trainer(config, workdir, restore=False)  # params, counters and iterators of the source's cold start
    open(os.path.join(trainer.workdir, "eval.jsonl"), "w").close()  # the source's sft_end records: evaluated anew
    trainer.logger.lines["eval"] = 0
    trainer.evaluate_all("sft_end")
    rows = [r for r in metrics.read_jsonl(os.path.join(source, "metrics.jsonl")) if r["stage"] == "sft"]
    with open(os.path.join(trainer.workdir, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(r, sort_keys=True) + "\n" for r in rows)
    shutil.copytree(os.path.join(source, SFT_CHECKPOINT), os.path.join(trainer.workdir, SFT_CHECKPOINT))
    counters = {**dataclasses.asdict(trainer.state.counters), "stage": "done"}
    trainer.logger.close()
    trainer.setup.rewards.close()
    summary = metrics.write_summary(trainer.workdir, counters, config.rl.algorithm, "rl_end")
    summary["adopted_from"] = source
    with open(os.path.join(trainer.workdir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(metrics.summary_table(summary))


if __name__ == "__main__":
    run_cli(main, "the sweep's cold_start/seed{S} directory to create")
