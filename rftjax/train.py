"""The main job: an SFT cold start, then RL fine-tuning, sharded, checkpointed, logged and evaluated.

    python -m rftjax.train --config configs/digits_grpo.py --workdir runs/digits [--config.rl.steps=100]

Rerunning the same command with the same workdir resumes from the latest checkpoint (params, optimizer
states, reference params, data-iterator states, stage counters): the resumed run computes exactly what an
uninterrupted one would. SIGTERM / SIGINT save a checkpoint after the current step, then exit cleanly.

Outputs under WORKDIR: metrics.jsonl, eval.jsonl, samples.jsonl, tensorboard/, checkpoints/, curves.png,
summary.json. See DESIGN.md for the data flow of one RL iteration.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import signal
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from rftjax import metrics as run_metrics
from rftjax import configs, rewards, rl, sharding, steps
from rftjax.rl.dapo import groups_with_signal
from rftjax.checkpoint import Checkpointer
from rftjax.data import augment as augment_lib
from rftjax.data.pipeline import Preprocess, TaskSource, iterator_state, make_dataset
from rftjax.data.tasks import get_task
from rftjax.data.tokenizer import TextTokenizer
from rftjax.evaluate import evaluate, rollout_texts, score_groups
from rftjax.models import VLM, dummy_inputs, get_preset, param_count
from rftjax.models import hf as rhf

log = logging.getLogger("rftjax")
SFT_CHECKPOINT = "sft_checkpoint"  # the cold-start result, kept for RL ablations (rl.init_from_sft)


# ----------------------------------------------------------------------------------------------------------
# Config


def validate_config(c: ml_collections.ConfigDict, n_data_shards: int, algo: rl.AlgorithmConfig) -> None:
    """Raise a ValueError that says what to change for a config that cannot work."""
    def need(cond, msg):
        if not cond:
            raise ValueError(f"bad config: {msg}")

    n_rows = c.rl.prompts_per_step * algo.group_size
    mb = c.rl.minibatch_size or n_rows
    need(c.rl.prompts_per_step >= 1 and c.rl.steps >= 0, "rl.prompts_per_step must be >= 1 and rl.steps >= 0")
    need(n_rows % mb == 0, f"rl.minibatch_size={mb} must divide prompts_per_step x group_size = {n_rows}")
    for name, rows in (("sft.batch_size", c.sft.batch_size), ("rl.minibatch_size (or prompts x group_size)", mb),
                       ("rl.prompts_per_step", c.rl.prompts_per_step), ("eval.batch_size", c.eval.batch_size)):
        need(rows % n_data_shards == 0, f"{name}={rows} is not divisible by the mesh's data x fsdp = "
                                        f"{n_data_shards} devices; make it a multiple of {n_data_shards}")
    need(c.eval.pass_k == 0 or c.eval.batch_size % c.eval.pass_k == 0 and
         (c.eval.batch_size // c.eval.pass_k) % n_data_shards == 0,
         f"eval.batch_size={c.eval.batch_size} / eval.pass_k={c.eval.pass_k} must be a multiple of {n_data_shards}")
    need(c.data.source in ("procedural", "tfds"), f"data.source={c.data.source!r}: choose procedural or tfds")
    need(c.sft.enabled or c.rl.enabled, "enable at least one of sft and rl")
    need(c.data.sft_examples > 0 and c.data.val_examples > 0, "data.sft_examples and val_examples must be > 0")
    need(c.optim.grad_accum >= 1, "optim.grad_accum must be >= 1")
    gen = c.rl.gen_prompts_per_round
    need(gen == 0 or algo.dynamic_sampling and gen % c.rl.prompts_per_step == 0,
         f"rl.gen_prompts_per_round={gen} needs dynamic sampling (rl.algo.dynamic_sampling=True) and must be a "
         f"multiple of rl.prompts_per_step={c.rl.prompts_per_step}; or set it to 0")
    need(algo.overlong_buffer_len <= c.rl.max_new_tokens,
         f"rl.algo.overlong_buffer_len={algo.overlong_buffer_len} (DAPO's L_cache) must be <= rl.max_new_tokens="
         f"{c.rl.max_new_tokens}; lower it or raise max_new_tokens")


def _parse_augment(spec: str):
    if not spec:
        return None
    kind, _, value = spec.partition(":")
    if kind == "noise":
        return augment_lib.gaussian_noise(float(value or 0.1))
    if kind == "crop":
        return augment_lib.random_crop(float(value or 0.8))
    raise ValueError(f"bad config: data.augment={spec!r}; use 'noise:STD' or 'crop:MIN_SCALE'")


def trim_completions(rows: dict, multiple: int = 16) -> dict:
    """`rows` with `completion_ids` / `completion_mask` `[N, T]` cut to the batch's longest completion, rounded up
    to `multiple` tokens (at most `T`), so the update step does not compute on padding past every row's end.

    Rounding keeps the number of distinct shapes (each a compilation of the update step) at `T / multiple`.
    Exact: positions past every row's end are masked out of every loss and metric.
    """
    mask = rows["completion_mask"]
    t = mask.shape[1]
    longest = int(mask.sum(1).max()) if mask.size else 0
    keep = min(t, max(multiple, -(-longest // multiple) * multiple))
    return {**rows, "completion_ids": rows["completion_ids"][:, :keep], "completion_mask": mask[:, :keep]}


def _mean_metrics(ms: list[dict]) -> dict:
    keys = ms[0].keys()
    return {k: float(np.mean([float(m[k]) for m in ms])) for k in keys}


# ----------------------------------------------------------------------------------------------------------
# Trainer


class Trainer:
    """Holds the mesh, data pipelines, states and jitted steps of one run (see the module docstring)."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str, restore: bool = True):
        self.c = config
        self.workdir = os.path.abspath(workdir)
        os.makedirs(self.workdir, exist_ok=True)
        if config.mesh.distributed:
            jax.distributed.initialize()
        devices = jax.devices()[: config.mesh.num_devices or None]
        self.mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor, devices)
        self.n_data = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        self.algo = configs.algorithm(config)
        validate_config(config, self.n_data, self.algo)
        self.tokenizer = TextTokenizer()

        # Model
        if config.model.init_from:
            self.model_config, init_params = rhf.load_llava(config.model.init_from, **config.model.overrides.to_dict())
        else:
            self.model_config, init_params = get_preset(config.model.preset, **config.model.overrides.to_dict()), None
        mc = self.model_config
        if self.tokenizer.vocab_size > mc.text.vocab_size or mc.image_token_id != self.tokenizer.image_id:
            raise ValueError(f"bad config: the tokenizer ({self.tokenizer.vocab_size} tokens, image id "
                             f"{self.tokenizer.image_id}) does not fit the model (vocab {mc.text.vocab_size}, image "
                             f"id {mc.image_token_id}); set model.overrides.text.vocab_size / image_token_id")
        self.base_key = jax.random.key(config.seed)
        model = VLM(mc)
        params, self.param_shardings = sharding.init_sharded_params(
            model, jax.random.fold_in(self.base_key, 0), *dummy_inputs(mc), mesh=self.mesh)
        if init_params is not None:
            params = jax.device_put(init_params, self.param_shardings)
        self.params = params
        log.info("model: %s, %.1fM params, mesh %s", config.model.preset, param_count(mc) / 1e6, dict(self.mesh.shape))

        # Data
        self.task = get_task(config.data.task, seed=config.seed, image_size=mc.vision.image_size)
        self.pre = Preprocess(self.tokenizer, mc.vision.image_size, mc.num_image_tokens, config.data.max_prompt_len)
        self.pre_sft = Preprocess(self.tokenizer, mc.vision.image_size, mc.num_image_tokens,
                                  config.data.max_prompt_len, with_completion=True,
                                  max_completion_len=config.data.max_completion_len)
        d = config.data
        shortest = len(self.tokenizer.prompt_ids("", mc.num_image_tokens))
        if d.max_prompt_len < shortest:
            raise ValueError(f"bad config: data.max_prompt_len={d.max_prompt_len} cannot hold the chat template "
                             f"with its {mc.num_image_tokens} image tokens ({shortest} tokens before any question "
                             f"text); raise data.max_prompt_len to at least {shortest + 32}")
        self.sources = {"sft": self._source("train", d.sft_examples, 0),
                        "val": self._source("validation", d.val_examples),
                        "rl": self._source("train", d.rl_examples, d.sft_examples),
                        "test": self._source("test", d.test_examples),
                        "test_ood": self._source("test_ood", d.ood_examples)}
        pidx, pcount = jax.process_index(), jax.process_count()
        self.local = lambda n: n // pcount
        self.sft_iter = iter(make_dataset(self.sources["sft"], self.pre_sft,
                                          batch_size=self.local(config.sft.batch_size), seed=config.seed,
                                          process_index=pidx, process_count=pcount, num_workers=d.num_workers))
        self.rl_iter = iter(make_dataset(self.sources["rl"], self.pre,
                                         batch_size=self.local(config.rl.prompts_per_step), seed=config.seed + 1,
                                         process_index=pidx, process_count=pcount,
                                         augment=_parse_augment(d.augment), num_workers=d.num_workers))
        self.reward_config = rewards.RewardConfig(
            accuracy_weight=config.reward.accuracy_weight, format_weight=config.reward.format_weight,
            overlong_buffer_len=self.algo.overlong_buffer_len, max_len=config.rl.max_new_tokens,
            box_iou=config.reward.box_iou)

        # Jitted functions
        self.logprob_fn = jax.jit(lambda p, b: steps.completion_logprobs(p, mc, b, config.rl.temperature))
        self.sft_eval_fn = jax.jit(functools.partial(steps.sft_loss, config=mc))
        self.values_fn = jax.jit(lambda p, b: steps.critic_values(p, mc, b))

        # Run bookkeeping (restored from a checkpoint when there is one)
        self.meta = {"stage": "sft" if config.sft.enabled else "rl", "global_step": 0, "sft_step": 0, "rl_step": 0,
                     "best_val_loss": None, "bad_evals": 0, "sft_time_s": 0.0, "rl_time_s": 0.0,
                     "key_data": np.asarray(jax.random.key_data(self.base_key)).tolist()}
        self.ckpt = Checkpointer(self.workdir, config.checkpoint.keep)
        self.policy = self.critic = None
        self.ref_params = None
        self.best_params = None
        self._build_stage_state()
        restored = restore and self.ckpt.latest_step() is not None
        if restored:
            self._restore(self.ckpt, self.ckpt.latest_step())
        elif config.rl.init_from_sft:
            self._start_from_sft(config.rl.init_from_sft)
        self.logger = run_metrics.RunLogger(self.workdir, self.meta["global_step"], config.log.tensorboard)
        self.stop_requested = False
        if restored:
            log.info("resumed from step %d (stage %s)", self.meta["global_step"], self.meta["stage"])

    # ---- helpers ------------------------------------------------------------------------------------------

    def _source(self, split: str, n: int, offset: int = 0):
        if self.c.data.source == "tfds":
            from rftjax.data import tfds_builders

            data_dir = self.c.data.data_dir or os.path.join(self.workdir, "tfds")
            tfds_builders.build(self.task.name, data_dir)
            src = tfds_builders.data_source(self.task.name, split, data_dir)
            if offset or n < len(src):
                return _Slice(src, offset, n)
            return src
        return TaskSource(self.task, split, n, offset)

    def put(self, x):
        """A host batch array -> a global array sharded over the mesh's data axes."""
        x = np.asarray(x)
        if x.dtype.kind in "US":
            return x
        spec = sharding.batch_sharding(self.mesh, x.ndim)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            return multihost_utils.host_local_array_to_global_array(x, self.mesh, spec.spec)
        return jax.device_put(x, spec)

    def _device_batch(self, batch: dict) -> dict:
        return {k: self.put(v) for k, v in batch.items() if np.asarray(v).dtype.kind not in "US"}

    def _make_state(self, params, lr, warmup, total, weight_decay):
        sched = steps.make_schedule(lr, total, warmup, self.c.optim.lr_decay)
        tx = steps.make_optimizer(sched, weight_decay, self.c.optim.b1, self.c.optim.b2, self.c.optim.grad_clip,
                                  self.c.optim.grad_accum, {"vision_tower": self.c.optim.vision_lr_scale})
        state = jax.jit(lambda p: steps.TrainState.create(p, tx))(params)
        return state, sched

    def _build_stage_state(self):
        """Train states, schedules and update functions for the current stage."""
        c = self.c
        if self.meta["stage"] == "sft" or c.rl.control_sft_seconds > 0 and self.meta["stage"] == "rl":
            self.policy, self.schedule = self._make_state(self.params, c.sft.lr, c.sft.warmup_steps, c.sft.max_steps,
                                                          c.sft.weight_decay)
            loss = functools.partial(steps.sft_loss, config=self.model_config)
        else:
            n_updates = c.rl.steps * self.algo.num_iterations * (
                c.rl.prompts_per_step * self.algo.group_size // (c.rl.minibatch_size or
                                                                 c.rl.prompts_per_step * self.algo.group_size))
            self.policy, self.schedule = self._make_state(self.params, c.rl.lr, c.rl.warmup_steps, n_updates,
                                                          c.rl.weight_decay)
            loss = functools.partial(steps.rl_loss, config=self.model_config, algo=self.algo,
                                     temperature=c.rl.temperature)
            if self.algo.uses_reference:
                self.ref_params = jax.tree.map(jnp.copy, self.params)
            if self.algo.uses_critic:
                self.critic, _ = self._make_state(steps.init_critic(self.params, self.model_config), c.rl.critic_lr,
                                                  0, n_updates, 0.0)
                self.critic_update = steps.make_update(functools.partial(
                    steps.critic_loss, config=self.model_config, algo=self.algo),
                    jax.tree.map(lambda x: x.sharding, self.critic))
        self.update = steps.make_update(loss, jax.tree.map(lambda x: x.sharding, self.policy))

    def _ckpt_state(self) -> dict:
        return {"policy": self.policy, "ref": self.ref_params if self.ref_params is not None else {},
                "critic": self.critic if self.critic is not None else {},
                "best": self.best_params if self.best_params is not None else {}}

    def save(self, ckpt: Checkpointer | None = None, state=None):
        data = {"sft": iterator_state(self.sft_iter), "rl": iterator_state(self.rl_iter)}
        state = self._ckpt_state() if state is None else state
        (ckpt or self.ckpt).save(self.meta["global_step"], state, data,
                       {**self.meta, "has_best": self.best_params is not None, "config": self.c.to_json()})

    def _adopt_meta(self, meta: dict):
        """Take the run counters of a checkpoint's `meta` (not its config or the has_best flag)."""
        self.meta.update({k: v for k, v in meta.items() if k not in ("config", "has_best")})

    def _start_from_sft(self, run_dir: str):
        """Begin at another run's cold-start result: its `sft_checkpoint/` and its `sft_end` evaluations."""
        src = Checkpointer(run_dir, subdir=SFT_CHECKPOINT)
        if src.latest_step() is None:
            raise ValueError(f"bad config: rl.init_from_sft={run_dir!r} has no {SFT_CHECKPOINT}/ (run its SFT stage)")
        step = src.latest_step()
        meta = src.read_meta(step)
        self._adopt_meta(meta)
        self.meta["stage"] = "rl"  # also when the source run had its RL stage disabled
        state, data, _ = src.restore(step, {"params": self.params})
        self.params = state["params"]
        self._build_stage_state()  # fresh RL optimizer; reference = the cold-start result
        self.sft_iter.set_state(data["sft"])
        self.rl_iter.set_state(data["rl"])
        evals = [e for e in run_metrics.read_jsonl(os.path.join(run_dir, "eval.jsonl")) if e["stage"] == "sft_end"]
        with open(os.path.join(self.workdir, "eval.jsonl"), "w") as f:
            f.writelines(json.dumps(e, sort_keys=True) + "\n" for e in evals)
        log.info("starting from the cold start of %s (step %d)", run_dir, self.meta["global_step"])

    def _restore(self, ckpt: Checkpointer, step: int):
        meta = ckpt.read_meta(step)
        self._adopt_meta(meta)
        self._build_stage_state()
        if meta.get("has_best"):
            self.best_params = self.params
        state, data, _ = ckpt.restore(step, self._ckpt_state())
        self.policy = state["policy"]
        self.params = self.policy.params
        self.ref_params = state["ref"] or None
        self.critic = state["critic"] or None
        self.best_params = state["best"] or None
        self.sft_iter.set_state(data["sft"])
        self.rl_iter.set_state(data["rl"])

    def _install_signal_handlers(self):
        def handler(signum, frame):
            log.warning("signal %d: saving a checkpoint after this step, then exiting", signum)
            self.stop_requested = True

        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, handler)

    def _progress(self, total: int, initial: int, desc: str):
        from tqdm import tqdm

        return tqdm(total=total, initial=initial, desc=desc, disable=not self.c.log.progress or jax.process_index(),
                    dynamic_ncols=True)

    # ---- SFT ----------------------------------------------------------------------------------------------

    def val_loss(self, params) -> float:
        it = iter(make_dataset(self.sources["val"], self.pre_sft, batch_size=self.c.sft.batch_size, shuffle=False,
                               num_epochs=1, drop_remainder=True, num_threads=1))
        losses = [float(self.sft_eval_fn(params, self._device_batch(b))[0]) for b in it]
        return float(np.mean(losses))

    def run_sft(self):
        c = self.c
        bar = self._progress(c.sft.max_steps, self.meta["sft_step"], "sft")
        t_start = time.perf_counter() - self.meta["sft_time_s"]
        while self.meta["sft_step"] < c.sft.max_steps and not self.stop_requested:
            t0 = time.perf_counter()
            batch = next(self.sft_iter)
            self.policy, m = self.update(self.policy, self._device_batch(batch))
            self.params = jax.block_until_ready(self.policy.params)
            self.meta["sft_step"] += 1
            self.meta["global_step"] += 1
            m = {k: float(v) for k, v in m.items()}
            m.update(lr=float(self.schedule(self.meta["sft_step"] - 1)), time_per_step_s=time.perf_counter() - t0)
            stop = False
            if self.meta["sft_step"] % c.sft.eval_every == 0:
                vl = self.val_loss(self.params)
                m["val_loss"] = vl
                best = self.meta["best_val_loss"]
                if best is None or vl < best * (1 - c.sft.min_delta_rel) - 1e-6:
                    self.meta.update(best_val_loss=vl, bad_evals=0, best_step=self.meta["global_step"])
                    self.best_params = jax.tree.map(jnp.copy, self.params)
                else:
                    self.meta["bad_evals"] += 1
                    stop = self.meta["bad_evals"] >= c.sft.patience
            self.meta["sft_time_s"] = time.perf_counter() - t_start
            self.logger.log(self.meta["global_step"], "sft", m)
            bar.update(1)
            bar.set_postfix(loss=f"{m['sft_loss']:.3f}", val=m.get("val_loss", self.meta["best_val_loss"]))
            if self.meta["global_step"] % c.checkpoint.every == 0:
                self.save()
            if stop:
                log.info("SFT: validation loss stopped improving (best %.4f at step %s)", self.meta["best_val_loss"],
                         self.meta.get("best_step"))
                break
        bar.close()
        if self.stop_requested:
            return
        if self.best_params is not None:  # keep the params with the best validation loss
            self.params = self.best_params
        self.evaluate_all("sft_end")
        self.meta["stage"] = "rl" if c.rl.enabled else "done"
        self.best_params = None
        self._build_stage_state()
        self.save()
        # The cold-start result alone (params + data positions), kept for RL ablations (rl.init_from_sft).
        self.save(Checkpointer(self.workdir, max_to_keep=1, subdir=SFT_CHECKPOINT), {"params": self.params})

    # ---- RL -----------------------------------------------------------------------------------------------

    def _rollouts(self, key) -> tuple[dict, dict]:
        """Rollout rows for one RL step (with DAPO's dynamic sampling when enabled): host arrays."""
        c, g = self.c, self.algo.group_size
        b = c.rl.prompts_per_step
        per_round = max(1, c.rl.gen_prompts_per_round // b)  # batches of prompts generated per round
        kept, spare, rounds, gen_time, gen_tokens, generated, signal_seen, correct = [], [], 0, 0.0, 0, 0, 0, 0.0
        while True:
            parts = [next(self.rl_iter) for _ in range(per_round)]
            batch = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
            t0 = time.perf_counter()
            out, texts = rollout_texts(self.params, self.model_config, self.tokenizer, batch,
                                       jax.random.fold_in(key, rounds), group_size=g,
                                       max_new_tokens=c.rl.max_new_tokens, greedy=False, temperature=c.rl.temperature,
                                       top_k=c.rl.top_k, top_p=c.rl.top_p, put=self.put)
            gen_time += time.perf_counter() - t0
            gen_tokens += int(out.lengths.sum())
            sc = score_groups(texts, batch, g, self.reward_config, out.lengths.tolist())
            signal = groups_with_signal(sc["total"], g)
            generated += len(signal)
            signal_seen += int(np.sum(signal))
            correct += float(np.sum(sc["correct"]))
            for i in range(len(batch["answer"])):
                rows = slice(i * g, (i + 1) * g)
                group = {"pixel_values": np.repeat(batch["pixel_values"][i:i + 1], g, 0),
                         "prompt_ids": np.repeat(batch["prompt_ids"][i:i + 1], g, 0),
                         "prompt_mask": np.repeat(batch["prompt_mask"][i:i + 1], g, 0),
                         "completion_ids": out.completion_ids[rows], "completion_mask": out.completion_mask[rows],
                         "truncated": out.truncated[rows], "lengths": out.lengths[rows],
                         **{f"r_{k}": v[rows] for k, v in sc.items()}, "texts": texts[rows],
                         "answer": [batch["answer"][i]] * g, "has_signal": [bool(signal[i])]}
                (kept if signal[i] or not self.algo.dynamic_sampling else spare).append(group)
            rounds += 1
            if len(kept) >= b or not self.algo.dynamic_sampling or rounds >= c.rl.dynamic_sampling_rounds:
                break
        filled = max(0, b - len(kept))
        groups = (kept + spare)[:b]
        rows = {k: (np.concatenate([gr[k] for gr in groups]) if not isinstance(groups[0][k], list)
                    else sum((gr[k] for gr in groups), [])) for k in groups[0]}
        info = {"rollout_time_s": gen_time, "rollout_tokens_per_s": gen_tokens / max(gen_time, 1e-9),
                "rollout_rounds": rounds, "dynamic_sampling_filled": filled,
                "rollout_groups_with_signal": signal_seen / generated,
                "rollout_accuracy": correct / (generated * g),  # over every rollout, not only the groups kept
                "groups_with_signal": float(np.mean(rows.pop("has_signal")))}
        return rows, info

    def rl_step(self):
        c, algo = self.c, self.algo
        step = self.meta["global_step"] + 1
        key = jax.random.fold_in(self.base_key, step)
        rows, info = self._rollouts(key)
        rows = trim_completions(rows)
        t0 = time.perf_counter()
        dev = self._device_batch({k: rows[k] for k in ("pixel_values", "prompt_ids", "prompt_mask", "completion_ids",
                                                       "completion_mask")})
        n = rows["completion_ids"].shape[0]
        mb = c.rl.minibatch_size or n
        on_policy = algo.num_iterations == 1 and mb == n
        need_old = not on_policy or algo.kl_in_reward
        old_lp = self.logprob_fn(self.params, dev)[0] if need_old else None
        ref_lp = self.logprob_fn(self.ref_params, dev)[0] if algo.uses_reference else None
        values = self.values_fn(self.critic.params, dev) if algo.uses_critic else None
        rewards_ = jnp.asarray(rows["r_total"])
        adv, returns = rl.compute_advantages(algo, rewards_, jnp.asarray(rows["completion_mask"]),
                                             None if old_lp is None else jnp.asarray(old_lp),
                                             None if ref_lp is None else jnp.asarray(ref_lp),
                                             None if values is None else jnp.asarray(values))
        full = {**{k: np.asarray(v) for k, v in rows.items() if k in dev}, "advantages": np.asarray(adv)}
        if not on_policy:
            full["old_logprobs"] = np.asarray(old_lp)
        if ref_lp is not None and not algo.kl_in_reward:
            full["ref_logprobs"] = np.asarray(ref_lp)
        if algo.uses_critic:
            full.update(old_values=np.asarray(values), returns=np.asarray(returns))
        policy_keys = [k for k in full if k not in ("old_values", "returns")]
        critic_keys = ["pixel_values", "prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "old_values",
                       "returns"]
        ms, cms = [], []
        rng = np.random.default_rng([c.seed, step])
        for _ in range(algo.num_iterations):
            perm = rng.permutation(n) if mb < n else np.arange(n)
            for s in range(0, n, mb):
                idx = perm[s:s + mb]
                self.policy, m = self.update(self.policy, self._device_batch({k: full[k][idx] for k in policy_keys}))
                ms.append(m)
                if algo.uses_critic:
                    self.critic, cm = self.critic_update(self.critic,
                                                         self._device_batch({k: full[k][idx] for k in critic_keys}))
                    cms.append(cm)
        self.params = jax.block_until_ready(self.policy.params)
        update_time = time.perf_counter() - t0
        m = _mean_metrics([{k: float(v) for k, v in x.items()} for x in ms])
        if cms:
            m.update(_mean_metrics([{k: float(v) for k, v in x.items()} for x in cms]))
        mask = rows["completion_mask"]
        m.update({
            "reward_mean": float(rows["r_total"].mean()), "reward_std": float(rows["r_total"].std()),
            "accuracy": float(rows["r_correct"].mean()), "format_rate": float(rows["r_format"].mean()),
            "reward_accuracy_mean": float(rows["r_accuracy"].mean()),
            "reward_format_mean": float(rows["r_format"].mean()),
            "reward_overlong_mean": float(rows["r_overlong"].mean()),
            "completion_len_mean": float(mask.sum(1).mean()), "completion_len_max": int(mask.sum(1).max()),
            "truncation_rate": float(rows["truncated"].mean()), "lr": float(self.schedule(int(self.policy.step) - 1)),
            "update_time_s": update_time, **info})
        m["time_per_step_s"] = info["rollout_time_s"] + update_time
        return m, rows

    def run_rl(self):
        c = self.c
        bar = self._progress(c.rl.steps, self.meta["rl_step"], c.rl.algorithm)
        t_start = time.perf_counter() - self.meta["rl_time_s"]
        while self.meta["rl_step"] < c.rl.steps and not self.stop_requested:
            m, rows = self.rl_step()
            self.meta["rl_step"] += 1
            self.meta["global_step"] += 1
            self.meta["rl_time_s"] = time.perf_counter() - t_start
            gs = self.meta["global_step"]
            self.logger.log(gs, "rl", m)
            if self.meta["rl_step"] % c.log.samples_every == 0:
                k = min(c.log.num_samples, len(rows["texts"]))
                self.logger.log_samples(gs, [{"completion": rows["texts"][i], "answer": rows["answer"][i],
                                              "reward": float(rows["r_total"][i])} for i in range(k)])
            if self.meta["rl_step"] % c.eval.every == 0 and self.meta["rl_step"] < c.rl.steps:
                self.evaluate_all("rl", c.eval.during_rl_examples, pass_k=0)
            bar.update(1)
            bar.set_postfix(reward=f"{m['reward_mean']:.3f}", acc=f"{m['accuracy']:.2f}",
                            s_per_step=f"{m['time_per_step_s']:.1f}")
            if gs % c.checkpoint.every == 0:
                self.save()
        bar.close()
        if not self.stop_requested:
            self.evaluate_all("rl_end")
            self.meta["stage"] = "done"
            self.save()

    def run_control_sft(self):
        """Control: spend `rl.control_sft_seconds` on more SFT over the same traced set (no early stopping)."""
        c = self.c
        t_start = time.perf_counter() - self.meta["rl_time_s"]
        bar = self._progress(None, 0, "control sft")
        while time.perf_counter() - t_start < c.rl.control_sft_seconds and not self.stop_requested:
            self.policy, m = self.update(self.policy, self._device_batch(next(self.sft_iter)))
            self.params = self.policy.params
            self.meta["rl_step"] += 1
            self.meta["global_step"] += 1
            self.meta["rl_time_s"] = time.perf_counter() - t_start
            self.logger.log(self.meta["global_step"], "control_sft", {k: float(v) for k, v in m.items()})
            bar.update(1)
        bar.close()
        if not self.stop_requested:
            self.evaluate_all("control_end")
            self.meta["stage"] = "done"
            self.save()

    # ---- evaluation and the whole run ---------------------------------------------------------------------

    def evaluate_all(self, stage: str, n: int | None = None, pass_k: int | None = None) -> dict:
        c = self.c
        pass_k = c.eval.pass_k if pass_k is None else pass_k
        results = {}
        for split in ("test", "test_ood"):
            r = evaluate(self.params, self.model_config, self.tokenizer, self.sources[split], self.pre,
                         batch_size=c.eval.batch_size, max_new_tokens=configs.eval_max_new_tokens(c),
                         rng=jax.random.fold_in(self.base_key, 10_000_000 + self.meta["global_step"]),
                         pass_k=pass_k, pass_n=c.eval.pass_n, reward_config=self.reward_config, put=self.put,
                         num_examples=n)
            self.logger.log_eval(self.meta["global_step"], stage, {"split": split, **r})
            results[split] = r
        log.info("eval (%s, step %d): test acc %.3f, ood acc %.3f", stage, self.meta["global_step"],
                 results["test"]["accuracy"], results["test_ood"]["accuracy"])
        return results

    def run(self) -> dict:
        self._install_signal_handlers()
        try:
            if self.meta["stage"] == "sft":
                self.run_sft()
            if self.meta["stage"] == "rl" and not self.stop_requested:
                if self.c.rl.control_sft_seconds > 0:
                    self.run_control_sft()
                else:
                    self.run_rl()
            if self.stop_requested:
                self.save()
                log.warning("stopped at step %d; rerun the same command to resume", self.meta["global_step"])
                return {}
            return self.finish()
        finally:
            self.logger.close()

    def finish(self) -> dict:
        evals = run_metrics.read_jsonl(os.path.join(self.workdir, "eval.jsonl"))

        def acc(stage, split, key="accuracy"):
            hits = [e.get(key) for e in evals if e["stage"] == stage and e["split"] == split]
            return hits[-1] if hits else None

        end = "control_end" if self.c.rl.control_sft_seconds > 0 else "rl_end"
        summary = {"global_step": self.meta["global_step"], "sft_steps": self.meta["sft_step"],
                   "rl_steps": self.meta["rl_step"], "sft_time_s": self.meta["sft_time_s"],
                   "rl_time_s": self.meta["rl_time_s"], "best_val_loss": self.meta["best_val_loss"],
                   "test_accuracy_after_sft": acc("sft_end", "test"), "test_accuracy_final": acc(end, "test"),
                   "ood_accuracy_after_sft": acc("sft_end", "test_ood"), "ood_accuracy_final": acc(end, "test_ood"),
                   "test_pass_at_k_after_sft": acc("sft_end", "test", "pass_at_k"),
                   "test_pass_at_k_final": acc(end, "test", "pass_at_k"), "algorithm": self.c.rl.algorithm}
        if summary["test_accuracy_after_sft"] is not None and summary["test_accuracy_final"] is not None:
            summary["test_accuracy_gain"] = summary["test_accuracy_final"] - summary["test_accuracy_after_sft"]
        with open(os.path.join(self.workdir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        try:
            run_metrics.plot_curves(self.workdir)
        except Exception as e:  # noqa: BLE001 - a plotting problem must not fail a finished run
            log.warning("plotting failed: %s", e)
        print(run_metrics.summary_table(summary))
        return summary


class _Slice:
    """Elements `[offset, offset + n)` of a random-access source."""

    def __init__(self, source, offset: int, n: int):
        if offset + n > len(source):
            raise ValueError(f"bad config: the TFDS split has {len(source)} examples, {offset + n} requested")
        self.source, self.offset, self.n = source, offset, n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return self.source[self.offset + int(i)]


def setup_logging() -> None:
    """rftjax's own INFO logs on stdout; absl/orbax chatter only from WARNING up."""
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


def main(config, workdir):
    setup_logging()
    Trainer(config, workdir).run()


if __name__ == "__main__":
    from rftjax.configs import run_cli

    run_cli(main, "run directory (created; rerun to resume)")
