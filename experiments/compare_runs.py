"""Compare the metrics.jsonl and eval.jsonl of two directories of runs (same arm names), timing keys excluded:
the largest absolute difference per arm and file, rows or keys that differ. See experiments/parity.sh.

    python experiments/compare_runs.py BEFORE_DIR AFTER_DIR
"""

import json
import os
import sys

from rftjax.metrics import is_measured, read_jsonl


def compare(a_dir: str, b_dir: str) -> float:
    """Print one line per arm and file; return the largest absolute difference of any numeric value."""
    worst_all = 0.0
    for arm in sorted(os.listdir(a_dir)):
        for name in ("metrics.jsonl", "eval.jsonl"):
            a, b = read_jsonl(os.path.join(a_dir, arm, name)), read_jsonl(os.path.join(b_dir, arm, name))
            if not a:
                continue
            if len(a) != len(b):
                print(f"{arm:14s} {name:14s} rows differ: {len(a)} vs {len(b)}")
                continue
            worst, where, keys = 0.0, None, set()
            for ra, rb in zip(a, b):
                keys |= {k for k in set(ra) ^ set(rb) if not is_measured(k)}
                for k, v in ra.items():
                    if is_measured(k) or k not in rb:
                        continue
                    if isinstance(v, (int, float)) and not isinstance(v, bool) and isinstance(rb[k], (int, float)):
                        if abs(v - rb[k]) > worst:
                            worst, where = abs(v - rb[k]), (k, ra.get("step"), v, rb[k])
                    elif v != rb[k]:
                        print(f"{arm:14s} {name:14s} {k} differs at step {ra.get('step')}: {v!r} vs {rb[k]!r}")
            worst_all = max(worst_all, worst)
            print(f"{arm:14s} {name:14s} rows={len(a)} max|diff|={worst:.3g} at {where} "
                  f"keys only in one: {sorted(keys)}")
    print(json.dumps({"max_abs_diff": worst_all}))
    return worst_all


if __name__ == "__main__":
    compare(*sys.argv[1:3])
