"""The Qwen2.5-VL arm of the behaviour check (experiments/parity.sh): a tiny random Qwen2.5-VL checkpoint written
by transformers (the tests' `qwen_dir`), EasyR1 files with images of random sizes, then 3 GRPO steps of
configs/qwen2_5_vl_easyr1.py on them (the tests' settings). Needs the test extra (torch, transformers).

    python experiments/parity_qwen.py OUT_DIR     # writes OUT_DIR/qwen_grpo/{metrics,eval}.jsonl
"""

import os
import pathlib
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(out: str) -> None:
    from helpers import write_easyr1
    from hf_reference import QWEN_TOKEN_IDS, make_hf_qwen_vl, make_tokenizer_dir

    data = os.path.join(out, "qwen_data")
    os.makedirs(data, exist_ok=True)
    _, path = make_hf_qwen_vl(pathlib.Path(data), vocab=320, ids=QWEN_TOKEN_IDS)
    ckpt = make_tokenizer_dir(path, "qwen")
    rng = np.random.default_rng(0)
    train = write_easyr1(os.path.join(data, "train.jsonl"), 32, rng, long_every=4)
    test = write_easyr1(os.path.join(data, "test.jsonl"), 8, rng)
    settings = {"model.checkpoint": ckpt, "data.train": f"easyr1:{train}", "data.test": f"easyr1:{test}",
                "model.dtype": "float32", "data.max_prompt_len": 96, "rl.steps": 3, "rl.prompts_per_step": 2,
                "rl.algo.group_size": 2, "rl.max_new_tokens": 8, "rl.lr": 1e-3, "rl.warmup_steps": 0,
                "eval.batch_size": 4, "eval.every": 100, "log.progress": False, "log.tensorboard": False,
                "mesh.num_devices": 1}
    subprocess.run([sys.executable, "-m", "rftjax.train", "--config", "configs/qwen2_5_vl_easyr1.py", "--workdir",
                    os.path.join(out, "qwen_grpo"), *(f"--config.{k}={v}" for k, v in settings.items())],
                   cwd=ROOT, check=True)


if __name__ == "__main__":
    main(sys.argv[1])
