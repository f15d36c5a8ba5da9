"""Slow user reward functions for experiments/bench_rewards.py (EasyR1's batch signature)."""

import time


def sleeps(reward_inputs):
    """I/O-bound: waits 0.1 s per completion (a sandbox or a judge-model call), then scores 1."""
    time.sleep(0.1)
    return [{"overall": 1.0} for _ in reward_inputs]


WORK = 1_000_000  # loop iterations: about 0.1 s of one core here


def computes(reward_inputs):
    """CPU-bound: a fixed amount of pure-Python work per completion (`WORK` iterations), then scores 1."""
    n = 0
    for i in range(WORK):
        n += i & 7
    return [{"overall": 1.0} for _ in reward_inputs]
