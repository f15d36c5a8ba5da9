"""Photo-sized images on a laptop: `configs/qwen2_5_vl_easyr1.py` with a tiny random Qwen2.5-VL checkpoint (hidden
size 64, written by transformers) on EasyR1 rows of real photos, defaults otherwise (16 prompts x G = 5, prompts up
to 1,024 tokens with up to 1,024 image tokens, completions up to 1,024 tokens): peak resident memory of the whole
`python -m rftjax.train` process (`/usr/bin/time -v`; it includes the evaluation at the end of the stage) and over
its first 3 GRPO steps (the trainer's `host_peak_rss_gb` at the third step), and the step's time split.

    python experiments/real_images.py        # prints the table, saves experiments/results/real_images.md

The rows: the 640x480 blood-smear photos of ../shared/data/bccd ("how many red blood cells?", the count from its
annotations) and the largest, mixed-aspect MATH-V figures of ../shared/data/mathv_testmini (1,383x1,774 to
2,520x2,761 px; the processor resizes them to at most 1,024 tokens = 4,096 patches), alternating. Needs torch and
transformers (the checkpoint); the run itself is rftjax only.
"""

from __future__ import annotations

import csv
import glob
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(os.path.dirname(ROOT), "shared", "data")
STEPS = 3


def write_rows(path: str, n: int) -> dict:
    """An EasyR1 jsonl of `n` rows alternating BCCD photos and MATH-V figures (absolute image paths); returns the
    image sizes used."""
    counts: dict[str, int] = {}
    with open(os.path.join(DATA, "bccd", "test.csv")) as f:
        for row in csv.DictReader(f):
            counts[row["filename"]] = counts.get(row["filename"], 0) + (row["cell_type"] == "RBC")
    photos = sorted(counts)
    from PIL import Image

    figures = sorted(glob.glob(os.path.join(DATA, "mathv_testmini", "images", "*")),
                     key=lambda f: -Image.open(f).size[0] * Image.open(f).size[1])  # the largest first

    rows, sizes = [], []
    for i in range(n):
        if i % 2 == 0:
            name = photos[i // 2 % len(photos)]
            image = os.path.join(DATA, "bccd", "BCCD", "JPEGImages", name)
            rows.append({"problem": "<image>How many red blood cells are in this smear?", "answer": str(counts[name]),
                         "images": [image]})
        else:
            image = figures[i // 2 % len(figures)]
            rows.append({"problem": "<image>What is the largest number written in the figure?", "answer": "1",
                         "images": [image]})
        sizes.append(Image.open(image).size)
    with open(path, "w") as f:
        f.write("\n".join(json.dumps(r) for r in rows) + "\n")
    return {"image sizes (px)": sorted(set(sizes), key=lambda s: s[0] * s[1])}


def checkpoint(root: pathlib.Path) -> str:
    """The tiny random Qwen2.5-VL checkpoint (hidden 64) with a 320-token BPE tokenizer and the chat template."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from hf_reference import QWEN_TOKEN_IDS, make_hf_qwen_vl, make_tokenizer_dir

    _, path = make_hf_qwen_vl(root, vocab=320, hidden=64, mrope=(2, 3, 3), ids=QWEN_TOKEN_IDS)
    return make_tokenizer_dir(path, "qwen")


def run(extra: tuple[str, ...] = ()) -> dict:
    """One 3-step run under `/usr/bin/time -v`: peak RSS (GB), wall seconds, and the RL step's mean split."""
    work = pathlib.Path(tempfile.mkdtemp(prefix="rftjax-real-images-"))
    info = write_rows(str(work / "train.jsonl"), 32)
    write_rows(str(work / "test.jsonl"), 16)
    ckpt = checkpoint(work)
    cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "rftjax.train", "--config",
           os.path.join(ROOT, "configs", "qwen2_5_vl_easyr1.py"), "--workdir", str(work / "run"),
           f"--config.model.checkpoint={ckpt}", f"--config.data.train=easyr1:{work / 'train.jsonl'}",
           f"--config.data.test=easyr1:{work / 'test.jsonl'}", f"--config.rl.steps={STEPS}",
           "--config.eval.every=1000", "--config.checkpoint.every=1000", *extra]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"run failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    peak_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    wall = re.search(r"Elapsed \(wall clock\) time.*: ([\d:.]+)", proc.stderr).group(1)
    rows = [json.loads(line) for line in open(work / "run" / "metrics.jsonl")]
    rl = [r for r in rows if r.get("stage") == "rl"]
    mean = lambda key: sum(r.get(key, 0.0) for r in rl[1:]) / max(len(rl) - 1, 1)  # noqa: E731 - after compiling
    return {**info, "command": " ".join(cmd[2:]), "peak RSS GiB (whole process)": peak_kb / 2 ** 20,
            "peak RSS GiB over the RL steps": rl[-1]["host_peak_rss_gb"] * 1e9 / 2 ** 30, "wall": wall,
            "steps": len(rl),
            "first step s (compiles)": rl[0]["time_per_step_s"], "step s (after the first)": mean("time_per_step_s"),
            "rollout s": mean("rollout_time_s"), "reward s": mean("reward_time_s"), "update s": mean("update_time_s"),
            "completion tokens (mean)": mean("completion_len_mean")}


def main() -> None:
    from rftjax.hardware import cpu_model

    result = run()
    lines = [f"# Photo-sized images: {STEPS} GRPO steps of configs/qwen2_5_vl_easyr1.py, tiny random Qwen2.5-VL",
             "", f"CPU: {cpu_model()}, {os.cpu_count()} cores. `python experiments/real_images.py`.", "",
             "| | |", "|---|---|"]
    lines += [f"| {k} | {v:.2f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in result.items()]
    text = "\n".join(lines) + "\n"
    print(text)
    os.makedirs(os.path.join(ROOT, "experiments", "results"), exist_ok=True)
    with open(os.path.join(ROOT, "experiments", "results", "real_images.md"), "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
