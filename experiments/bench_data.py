"""Input-pipeline throughput: examples/s of the grain pipeline for each task at the default image size.

For each task and source (procedural `TaskSource`, which renders every example on the fly, and the TFDS
array_record build, which decodes stored PNGs) it times the full pipeline (shuffle, preprocess: resize,
normalise, template, tokenise, pad; batch of 32) three ways: no read-ahead (`num_threads=0`), grain
thread prefetch (2 threads), and 2 worker processes (`mp_prefetch`).

    python experiments/bench_data.py [--batches 30] [--batch-size 32]

Prints a table and writes experiments/results/bench_data.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

from rftjax.data import tfds_builders
from rftjax.data.pipeline import Preprocess, TaskSource, image_input_for, make_dataset
from rftjax.data.tasks import TASKS, get_task
from rftjax.data.tokenizer import TextTokenizer
from rftjax.models import get_preset

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
MODES = {"no prefetch": dict(num_threads=0, prefetch_buffer_size=0), "thread prefetch (2)": dict(num_threads=2),
         "2 worker processes": dict(num_threads=2, num_workers=2)}


def throughput(source, preprocess, batch_size: int, batches: int, **kw) -> float:
    it = iter(make_dataset(source, preprocess, batch_size=batch_size, seed=0, **kw))
    next(it)  # start-up (worker processes, first batch) is not counted
    t0 = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches * batch_size / (time.perf_counter() - t0)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args()
    import tensorflow_datasets as tfds

    tfds.disable_progress_bar()
    config = get_preset("default")
    pp = Preprocess(TextTokenizer(), image_input_for(config), max_prompt_len=128, with_completion=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in sorted(TASKS):
            tfds_builders.build(name, tmp, config="small")
            sources = {"procedural": TaskSource(get_task(name), "train", 5000),
                       "tfds array_record": tfds_builders.data_source(name, "train", tmp, config="small")}
            for source_name, source in sources.items():
                for mode, kw in MODES.items():
                    eps = throughput(source, pp, args.batch_size, args.batches, **kw)
                    rows.append(dict(task=name, source=source_name, mode=mode, examples_per_s=eps))
                    print(rows[-1], flush=True)
    lines = ["| task | source | mode | examples/s |", "|---|---|---|---|"]
    lines += [f"| {r['task']} | {r['source']} | {r['mode']} | {r['examples_per_s']:.0f} |" for r in rows]
    meta = (f"{config.vision.image_size}px images, prompt 128 + completion 64 tokens, batch {args.batch_size}, "
            f"{args.batches} batches after the first, {os.cpu_count()} cores")
    table = meta + "\n\n" + "\n".join(lines)
    print("\n" + table)
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "bench_data.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(RESULTS, "bench_data.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
