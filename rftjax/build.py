"""Build a run from its config: mesh, model and initial params, tokenizer, data sources and preprocessors,
algorithm, rollout and reward settings. `python -m rftjax.train` and `python -m rftjax.evaluate` both start
here; this is the seam where new model families, tokenizers and data sources plug in.

    run = build_run(config, workdir)          # a Run: everything static about the run, params included
    sft_iter, rl_iter = train_iterators(run)  # the checkpointable training pipelines
    batch = run.put(host_pytree)              # host arrays -> global arrays sharded over the data axes
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from rftjax import configs, rewards, rl, sharding
from rftjax.data import augment as augment_lib
from rftjax.data.pipeline import Preprocess, TaskSource, make_dataset
from rftjax.data.tasks import get_task
from rftjax.data.tokenizer import TextTokenizer
from rftjax.models import VLM, QwenVLConfig, VLMConfig, dummy_inputs, get_preset, param_count
from rftjax.models import hf as rhf
from rftjax.rollout import RolloutConfig

log = logging.getLogger("rftjax")


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
    gen = algo.gen_prompts_per_round
    need(gen % c.rl.prompts_per_step == 0, f"rl.algo.gen_prompts_per_round={gen} must be a multiple of "
                                           f"rl.prompts_per_step={c.rl.prompts_per_step}; or set it to 0")
    need(algo.overlong_buffer_len <= c.rl.max_new_tokens,
         f"rl.algo.overlong_buffer_len={algo.overlong_buffer_len} (DAPO's L_cache) must be <= rl.max_new_tokens="
         f"{c.rl.max_new_tokens}; lower it or raise max_new_tokens")


def parse_augment(spec: str):
    """`data.augment` -> an image augmentation of the RL prompts (or None): `noise:STD` or `crop:MIN_SCALE`.

    Raises:
      ValueError: another kind.
    """
    if not spec:
        return None
    kind, _, value = spec.partition(":")
    if kind == "noise":
        return augment_lib.gaussian_noise(float(value or 0.1))
    if kind == "crop":
        return augment_lib.random_crop(float(value or 0.8))
    raise ValueError(f"bad config: data.augment={spec!r}; use 'noise:STD' or 'crop:MIN_SCALE'")


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


@dataclasses.dataclass(frozen=True)
class Run:
    """Everything static about one run (nothing here changes while it trains).

    Attributes:
      config: the run's `ml_collections.ConfigDict`; workdir: absolute path of the run directory.
      mesh: the `(data, fsdp, tensor)` device mesh.
      model_config: the `VLMConfig`; algo: the `rl.AlgorithmConfig` (preset + `rl.algo` overrides).
      params: the initial params (random init or `model.init_from`), sharded by `param_shardings`.
      key: the run's base PRNG key (`config.seed`).
      tokenizer: the text tokenizer; sources: random-access data sources `sft`, `val`, `rl`, `test`, `test_ood`.
      prompt_pre, sft_pre: preprocessors of prompts (RL, evaluation) and of prompt + traced completion (SFT).
      reward_config: the reward weights and shaping; rollout_config: how an RL step samples.
    """

    config: ml_collections.ConfigDict
    workdir: str
    mesh: Mesh
    model_config: VLMConfig
    algo: rl.AlgorithmConfig
    params: Any
    param_shardings: Any
    key: jax.Array
    tokenizer: TextTokenizer
    sources: dict[str, Any]
    prompt_pre: Preprocess
    sft_pre: Preprocess
    reward_config: rewards.RewardConfig
    rollout_config: RolloutConfig

    def put(self, tree):
        """A pytree of host batch arrays `[B, ...]` -> global arrays sharded over the mesh's data axes, in one
        transfer (`jax.device_put`, or `host_local_array_to_global_array` when there are several processes:
        then each process passes its local rows)."""
        tree = jax.tree.map(np.asarray, tree)
        specs = jax.tree.map(lambda x: sharding.batch_sharding(self.mesh, x.ndim), tree)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            return multihost_utils.host_local_array_to_global_array(tree, self.mesh, jax.tree.map(
                lambda s: s.spec, specs))
        return jax.device_put(tree, specs)


def _source(c: ml_collections.ConfigDict, workdir: str, task, split: str, n: int, offset: int = 0):
    if c.data.source == "tfds":
        from rftjax.data import tfds_builders

        data_dir = c.data.data_dir or os.path.join(workdir, "tfds")
        tfds_builders.build(task.name, data_dir)
        src = tfds_builders.data_source(task.name, split, data_dir)
        return _Slice(src, offset, n) if offset or n < len(src) else src
    return TaskSource(task, split, n, offset)


def _model(c: ml_collections.ConfigDict, tokenizer: TextTokenizer, mesh: Mesh, key: jax.Array):
    """`(model_config, params, param_shardings)`: the preset (or HF directory) with `model.overrides`, params
    created in their shardings (or loaded and placed there)."""
    overrides = c.model.overrides.to_dict()
    if c.model.init_from:
        qwen = rhf.read_hf_config(c.model.init_from).get("model_type") in ("qwen2_5_vl", "qwen2_vl")
    else:
        qwen = isinstance(get_preset(c.model.preset), QwenVLConfig)
    if qwen:
        raise ValueError(f"bad config: {c.model.init_from or c.model.preset!r} is a Qwen-VL model, and the trainer's "
                         f"data pipeline (square images, the packaged tokenizer) does not feed Qwen-VL yet; use "
                         f"rftjax.models.model_for / rftjax.sampling.generate directly, or a LLaVA-layout model")
    if c.model.init_from:
        model_config, loaded = rhf.load_llava(c.model.init_from, **overrides)
    else:
        model_config, loaded = get_preset(c.model.preset, **overrides), None
    if tokenizer.vocab_size > model_config.text.vocab_size or model_config.image_token_id != tokenizer.image_id:
        raise ValueError(f"bad config: the tokenizer ({tokenizer.vocab_size} tokens, image id {tokenizer.image_id}) "
                         f"does not fit the model (vocab {model_config.text.vocab_size}, image id "
                         f"{model_config.image_token_id}); set model.overrides.text.vocab_size / image_token_id")
    params, shardings = sharding.init_sharded_params(VLM(model_config), jax.random.fold_in(key, 0),
                                                     *dummy_inputs(model_config), mesh=mesh)
    if loaded is not None:
        params = jax.device_put(loaded, shardings)
    return model_config, params, shardings


def build_run(config: ml_collections.ConfigDict, workdir: str) -> Run:
    """The `Run` of `config` in `workdir` (created). Calls `jax.distributed.initialize()` first when
    `config.mesh.distributed`.

    Raises:
      ValueError: a config that cannot work (see `validate_config`), a tokenizer that does not fit the model,
        a `data.max_prompt_len` too short for the chat template and the image tokens.
    """
    c = config
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    if c.mesh.distributed:
        jax.distributed.initialize()
    mesh = sharding.make_mesh(c.mesh.data, c.mesh.fsdp, c.mesh.tensor, jax.devices()[: c.mesh.num_devices or None])
    algo = configs.algorithm(c)
    validate_config(c, mesh.shape["data"] * mesh.shape["fsdp"], algo)
    tokenizer = TextTokenizer()
    key = jax.random.key(c.seed)
    model_config, params, shardings = _model(c, tokenizer, mesh, key)
    log.info("model: %s, %.1fM params, mesh %s", c.model.preset, param_count(model_config) / 1e6, dict(mesh.shape))

    d, image_size, n_image = c.data, model_config.vision.image_size, model_config.num_image_tokens
    shortest = len(tokenizer.prompt_ids("", n_image))
    if d.max_prompt_len < shortest:
        raise ValueError(f"bad config: data.max_prompt_len={d.max_prompt_len} cannot hold the chat template with its "
                         f"{n_image} image tokens ({shortest} tokens before any question text); raise "
                         f"data.max_prompt_len to at least {shortest + 32}")
    task = get_task(d.task, seed=c.seed, image_size=image_size)
    splits = {"sft": ("train", d.sft_examples, 0), "val": ("validation", d.val_examples, 0),
              "rl": ("train", d.rl_examples, d.sft_examples), "test": ("test", d.test_examples, 0),
              "test_ood": ("test_ood", d.ood_examples, 0)}
    return Run(
        config=c, workdir=workdir, mesh=mesh, model_config=model_config, algo=algo, params=params,
        param_shardings=shardings, key=key, tokenizer=tokenizer,
        sources={name: _source(c, workdir, task, *split) for name, split in splits.items()},
        prompt_pre=Preprocess(tokenizer, image_size, n_image, d.max_prompt_len),
        sft_pre=Preprocess(tokenizer, image_size, n_image, d.max_prompt_len, with_completion=True,
                           max_completion_len=d.max_completion_len),
        reward_config=rewards.RewardConfig(
            accuracy_weight=c.reward.accuracy_weight, format_weight=c.reward.format_weight,
            overlong_buffer_len=algo.overlong_buffer_len, max_len=c.rl.max_new_tokens, box_iou=c.reward.box_iou),
        rollout_config=RolloutConfig(
            group_size=algo.group_size, prompts_per_step=c.rl.prompts_per_step, max_new_tokens=c.rl.max_new_tokens,
            temperature=c.rl.temperature, top_k=c.rl.top_k, top_p=c.rl.top_p,
            dynamic_sampling=algo.dynamic_sampling, gen_prompts_per_round=algo.gen_prompts_per_round,
            dynamic_sampling_rounds=algo.dynamic_sampling_rounds))


def train_iterators(run: Run):
    """`(sft_iter, rl_iter)`: the shuffled, repeating grain iterators of the SFT traces and the RL prompts, each
    process reading its share (checkpointable: `get_state()` / `set_state()`)."""
    c, d = run.config, run.config.data
    pidx, pcount = jax.process_index(), jax.process_count()
    common = dict(process_index=pidx, process_count=pcount, num_workers=d.num_workers)
    sft = make_dataset(run.sources["sft"], run.sft_pre, batch_size=c.sft.batch_size // pcount, seed=c.seed, **common)
    rl_ = make_dataset(run.sources["rl"], run.prompt_pre, batch_size=c.rl.prompts_per_step // pcount,
                       seed=c.seed + 1, augment=parse_augment(d.augment), **common)
    return iter(sft), iter(rl_)
