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

import flax.linen as nn
import jax
import ml_collections
from jax.sharding import Mesh

from rftjax import configs, hardware, rewards, rl, sharding, trainable
from rftjax.data import augment as augment_lib
from rftjax.data import importers
from rftjax.data.pipeline import Preprocess, TaskSource, image_input_for, make_dataset
from rftjax.data.video import VideoSampling
from rftjax.data.tasks import get_task
from rftjax.data.tokenizer import TextTokenizer
from rftjax.models import (LoraConfig, ModelConfig, abstract_params, dummy_inputs, family_of, get_preset, model_for,
                           param_count)
from rftjax.models import hf as rhf
from rftjax.models import lora as lora_lib
from rftjax.rewards import models as reward_models
from rftjax.rewards.parsing import INSTRUCTIONS
from rftjax.rollout import Policy, RolloutConfig
from rftjax.sampling import SamplingParams

log = logging.getLogger("rftjax")


def validate_config(c: ml_collections.ConfigDict, n_data_shards: int, algo: rl.AlgorithmConfig) -> None:
    """Raise a ValueError that says what to change for a config that cannot work."""
    def need(cond, msg):
        if not cond:
            raise ValueError(f"bad config: {msg}")

    n_rows = c.rl.prompts_per_step * algo.group_size
    need(c.data.train or c.data.task != "describe" or c.reward.model or c.reward.judge,
         "data.task=describe has no gold answers: set reward.model=DIR or reward.judge=DIR to score it")
    mb = c.rl.minibatch_size or n_rows
    need(c.rl.prompts_per_step >= 1 and c.rl.steps >= 0, "rl.prompts_per_step must be >= 1 and rl.steps >= 0")
    need(n_rows % mb == 0, f"rl.minibatch_size={mb} must divide prompts_per_step x group_size = {n_rows}")
    micro = c.rl.micro_batch_size or mb
    need(micro >= 1 and mb % micro == 0 and micro % n_data_shards == 0,
         f"rl.micro_batch_size={micro} must divide the minibatch ({mb} rows) and be a multiple of the mesh's data x "
         f"fsdp = {n_data_shards} devices")
    for name, rows in (("sft.batch_size", c.sft.batch_size), ("rl.minibatch_size (or prompts x group_size)", mb),
                       ("rl.prompts_per_step", c.rl.prompts_per_step), ("eval.batch_size", c.eval.batch_size)):
        need(rows % n_data_shards == 0, f"{name}={rows} is not divisible by the mesh's data x fsdp = "
                                        f"{n_data_shards} devices; make it a multiple of {n_data_shards}")
    need(c.eval.get("pass_k") is None, f"eval.pass_k={c.eval.get('pass_k')} was renamed: set eval.pass_n (samples "
                                       f"per problem; pass@k is reported for every k <= pass_n) and eval.pass_problems")
    need(c.eval.pass_n == 0 or configs.pass_at_k_prompts(c.eval.batch_size, c.eval.pass_n) % n_data_shards == 0,
         f"eval.batch_size={c.eval.batch_size} // eval.pass_n={c.eval.pass_n} (prompts per pass@k batch, at least 1) "
         f"must be a multiple of the {n_data_shards} data devices: raise eval.batch_size")
    need(c.rl.control_schedule in ("continue", "restart"),
         f"rl.control_schedule={c.rl.control_schedule!r}: choose continue (the cold start's schedule goes on) or "
         f"restart (warm-up to sft.lr again)")
    need(c.data.source in ("procedural", "tfds"), f"data.source={c.data.source!r}: choose procedural or tfds")
    need(c.data.task != "motion" or c.data.train or c.data.source == "procedural",
         "data.task=motion (videos) is rendered on the fly only: set data.source=procedural")
    need(c.reward.answer_format in INSTRUCTIONS, f"reward.answer_format={c.reward.answer_format!r}: choose one of "
                                                 f"{sorted(INSTRUCTIONS)}")
    if c.data.train:
        need(not c.sft.enabled and c.rl.control_sft_seconds == 0,
             f"data.train={c.data.train!r} has no reasoning traces for an SFT cold start or control: set "
             f"sft.enabled=False and rl.control_sft_seconds=0 (start from a checkpoint: model.checkpoint=DIR)")
        need(bool(c.data.test), "data.train is a file dataset: set data.test=KIND:PATH too (held-out evaluation)")
    need(c.sft.enabled or c.rl.enabled, "enable at least one of sft and rl")
    need(c.data.sft_examples > 0 and c.data.val_examples > 0, "data.sft_examples and val_examples must be > 0")
    need(c.optim.grad_accum >= 1, "optim.grad_accum must be >= 1")


def rollout_config_of(c: ml_collections.ConfigDict, algo: rl.AlgorithmConfig, model_config) -> RolloutConfig:
    """The run's `RolloutConfig`: `rl.*` sampling settings, G from `algo`, the schedule of `configs.schedule`,
    NoisyRollout (`rl.noisy_rollout`, on the media of `model_config`).

    Raises:
      ValueError: settings that cannot work (`RolloutConfig`, `SamplingParams`, `NoisyRollout`), naming them.
    """
    sched, nr = configs.schedule(c), c.rl.noisy_rollout
    try:
        noisy = None if not nr.kind else augment_lib.NoisyRollout(
            media_input_of(c, model_config), c.rl.steps, nr.kind, nr.noise_step, nr.max_angle, nr.decay_coef,
            nr.decay_mid_step)
        if noisy is not None and noisy.kind == "rotate" and not family_of(model_config).augmentable:
            raise ValueError(f"rl.noisy_rollout.kind='rotate' rotates square LLaVA images; use 'gaussian' for "
                             f"{family_of(model_config).name}")
        return RolloutConfig(
            sampling=SamplingParams(group_size=algo.group_size, max_new_tokens=c.rl.max_new_tokens,
                                    temperature=c.rl.temperature, top_k=c.rl.top_k, top_p=c.rl.top_p),
            prompts_per_step=c.rl.prompts_per_step, dynamic_sampling=sched["dynamic_sampling"],
            gen_prompts_per_round=sched["gen_prompts_per_round"],
            dynamic_sampling_rounds=sched["dynamic_sampling_rounds"], noisy_rollout=noisy)
    except ValueError as e:
        raise ValueError(f"bad config: {e}") from None


def rewards_of(c: ml_collections.ConfigDict, context: rewards.SourceContext) -> rewards.Rewards:
    """The run's `rewards.Rewards`: the rules (`reward.*`), DAPO's overlong shaping (`configs.schedule`) and the
    `reward.sources` factories, called with `context`.

    Raises:
      ValueError: bad reward settings (a time limit <= 0, an unknown on_error, a reward function or source file
        or name that does not exist, an overlong buffer longer than rl.max_new_tokens, a name used twice).
    """
    r = c.reward
    try:
        rules = rewards.RewardConfig(
            accuracy_weight=r.accuracy_weight, format_weight=r.format_weight, box_iou=r.box_iou,
            answer_format=r.answer_format, function=r.function, timeout_s=r.timeout_s, num_workers=r.num_workers,
            on_error=r.on_error)
        model = judge = None
        if r.model:
            model = reward_models.ModelRewardConfig(r.model, r.model_weight, r.model_mean, r.model_std,
                                                    r.model_batch_size, r.model_gate)
        if r.judge:
            judge = reward_models.JudgeConfig(r.judge, r.judge_template, r.judge_parse, r.judge_max_new_tokens,
                                              r.judge_weight, r.judge_batch_size, r.judge_gate)
        return rewards.build_rewards(rules, configs.schedule(c)["overlong_buffer_len"], context, r.sources, model,
                                     judge, r.aggregation)
    except ValueError as e:
        raise ValueError(f"bad config: {e}") from None


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
      model_config: the model config (any registered family); algo: the `rl.AlgorithmConfig` (preset + `rl.algo`
        overrides).
      params: the initial params (random init or `model.checkpoint`, LoRA adapters at their init), sharded by
        `param_shardings`.
      trainable_paths: key paths of the params that train (`rftjax.trainable.trainable_paths`: LoRA adapters
        only with LoRA; minus `optim.freeze`); `split` divides a param tree by them.
      key: the run's base PRNG key (`config.seed`).
      tokenizer: the packaged `TextTokenizer`, or the checkpoint's `rftjax.data.chat.CheckpointTokenizer`.
      sources: random-access data sources: `rl`, `test`, and for procedural tasks `sft`, `val`, `test_ood`
        (file datasets: `test_ood` when `data.test_ood` is set); `EVAL_SPLITS` that are present get evaluated.
      reports: the `ImportReport` of each file dataset (rows kept, bad rows, over-long prompts dropped).
      prompt_pre, sft_pre: preprocessors of prompts (RL, evaluation) and of prompt + traced completion (SFT).
      rewards: the reward sources and how they add up (`rewards.Rewards`: the rules under a time limit in worker
        processes, DAPO's overlong shaping, `reward.sources`).
      rollout_config: how an RL step samples (`RolloutConfig`: the sampling params, the schedule).
    """

    config: ml_collections.ConfigDict
    workdir: str
    mesh: Mesh
    model_config: ModelConfig
    algo: rl.AlgorithmConfig
    params: Any
    param_shardings: Any
    key: jax.Array
    tokenizer: TextTokenizer
    sources: dict[str, Any]
    prompt_pre: Preprocess
    sft_pre: Preprocess
    rewards: rewards.Rewards
    rollout_config: RolloutConfig
    reports: dict[str, importers.ImportReport] = dataclasses.field(default_factory=dict)
    trainable_paths: frozenset = frozenset()

    def split(self, params) -> tuple[dict, dict]:
        """`(trainable, frozen)` parts of a full param tree (`rftjax.trainable.split`; frozen `{}` when all train)."""
        return trainable.split(params, self.trainable_paths)

    @property
    def place(self) -> sharding.Placement:
        """How host batches reach the run's mesh and results come back (`rftjax.sharding.Placement`)."""
        return sharding.Placement(self.mesh)

    def policy(self, params) -> Policy:
        """The `rftjax.rollout.Policy` of `params` with the run's model config and tokenizer."""
        return Policy(params, self.model_config, self.tokenizer)

    def put(self, tree):
        """This process's rows of a host batch -> global arrays sharded over the mesh's data axes
        (`Placement.put`)."""
        return self.place.put(tree)


def _source(c: ml_collections.ConfigDict, workdir: str, task, split: str, n: int, offset: int = 0):
    if c.data.source == "tfds":
        from rftjax.data import tfds_builders

        data_dir = c.data.data_dir or os.path.join(workdir, "tfds")
        tfds_builders.build(task.name, data_dir)
        src = tfds_builders.data_source(task.name, split, data_dir)
        return _Slice(src, offset, n) if offset or n < len(src) else src
    return TaskSource(task, split, n, offset)


EVAL_SPLITS = ("test", "test_ood")


def model_overrides(c: ml_collections.ConfigDict) -> dict:
    """The model config fields the run sets: `model.overrides` with `dtype` = `model.dtype` resolved
    (`rftjax.hardware.compute_dtype`: "auto" picks bfloat16 or float32 for this machine, once per process).
    A `dtype` in `model.overrides` (the old place) still works, with a deprecation warning, when `model.dtype`
    is "auto".

    Raises:
      ValueError: an unknown `model.dtype`, or `model.overrides.dtype` set together with a different `model.dtype`.
    """
    overrides = {k: v for k, v in c.model.overrides.to_dict().items() if v is not None}  # None: unset placeholder
    name = c.model.get("dtype", "auto")
    if "dtype" in overrides:
        if name not in ("auto", overrides["dtype"]):
            raise ValueError(f"bad config: model.overrides.dtype={overrides['dtype']!r} and model.dtype={name!r} "
                             f"disagree; set only model.dtype")
        log.warning("config model.overrides.dtype is deprecated: use model.dtype=%s", overrides["dtype"])
        name = overrides["dtype"]
    return {**overrides, "dtype": hardware.compute_dtype(name)}


def model_config_of(c: ml_collections.ConfigDict):
    """The run's model config: `model.checkpoint`'s config.json (any family `rftjax.models.hf` reads) or the
    preset, with `model_overrides(c)` (`model.overrides` and the compute dtype of `model.dtype`), and `model.lora`
    when its rank is > 0.

    Raises:
      ValueError: an unknown preset, an unsupported checkpoint, a bad override or LoRA setting.
    """
    overrides = model_overrides(c)
    config = rhf.load_config(c.model.checkpoint, **overrides) if c.model.checkpoint else \
        get_preset(c.model.preset, **overrides)
    lora = c.model.lora
    if lora.rank:
        config = config.replace(lora=LoraConfig(rank=lora.rank, alpha=lora.alpha, dropout=lora.dropout,
                                                targets=lora.targets))
    return config


def media_input_of(c: ml_collections.ConfigDict, model_config):
    """The run's media input (`rftjax.data.pipeline.image_input_for`): the model family's, with `data.video`'s frame
    sampling where the family reads videos."""
    return image_input_for(model_config, VideoSampling(**c.data.video.to_dict()))


def init_params(c: ml_collections.ConfigDict, model_config, mesh: Mesh, key: jax.Array):
    """`(params, param_shardings)`: the `model.checkpoint` directory's weights placed in their shardings, or
    random params created in them; LoRA adapters initialised in theirs (the base weights are never initialised
    when they are loaded: XLA drops the unused part of the init)."""
    model, inputs, rng = model_for(model_config), dummy_inputs(model_config), jax.random.fold_in(key, 0)
    if not c.model.checkpoint:
        return sharding.init_sharded_params(model, rng, *inputs, mesh=mesh)
    shardings = sharding.param_shardings(model, *inputs, mesh=mesh)
    adapters = {p for p in trainable.flat_paths(shardings) if lora_lib.is_adapter(p)}
    new_shardings, base_shardings = trainable.split(shardings, adapters)
    _, loaded = rhf.load_pretrained(c.model.checkpoint, **model_overrides(c))
    params = jax.device_put(loaded, base_shardings)
    if adapters:
        init = jax.jit(lambda: trainable.split(nn.unbox(model.init(rng, *inputs)["params"]), adapters)[0],
                       out_shardings=new_shardings)
        params = trainable.combine(init(), params)
    return params, shardings


def tokenizer_of(c: ml_collections.ConfigDict, model_config) -> TextTokenizer:
    """The checkpoint's own tokenizer and chat template (`model.checkpoint`), else the packaged tokenizer; with
    the format instruction of `reward.answer_format`.

    Raises:
      ValueError: the tokenizer does not fit the model (vocabulary, image placeholder id).
    """
    instruction = INSTRUCTIONS[c.reward.answer_format]
    if c.model.checkpoint:
        from rftjax.data.chat import CheckpointTokenizer

        tokenizer = CheckpointTokenizer.for_model(c.model.checkpoint, model_config, instruction,
                                                  c.data.chat_template_kwargs.to_dict())
    else:
        family = family_of(model_config)
        if family.needs_checkpoint_tokenizer:
            raise ValueError(f"bad config: model.preset={c.model.preset!r} is a {family.name} model, which needs its "
                             f"own tokenizer and chat template: set model.checkpoint=DIR (an HF checkpoint directory "
                             f"of that family), or use a LLaVA-layout preset")
        tokenizer = TextTokenizer(instruction=instruction)
        if model_config.image_token_id != tokenizer.image_id:
            raise ValueError(f"bad config: the packaged tokenizer's image id is {tokenizer.image_id}, the model's "
                             f"{model_config.image_token_id}; set model.overrides.image_token_id")
    if tokenizer.vocab_size > model_config.text.vocab_size:
        raise ValueError(f"bad config: the tokenizer has {tokenizer.vocab_size} tokens, the model's vocabulary "
                         f"{model_config.text.vocab_size}; set model.overrides.text.vocab_size")
    return tokenizer


def file_source(spec: str, name: str, pre: Preprocess, max_prompt_len: int, reports: dict | None = None,
                open_ended: bool = False):
    """The examples of a dataset spec (`rftjax.data.importers.load_dataset`; `open_ended`: rows without an answer
    kept) without the rows whose prompt would not fit `max_prompt_len` (`drop_long_prompts`); the report is
    logged, printed and stored in `reports[name]`.

    Raises:
      ValueError: a bad spec, or no row that fits.
    """
    source, report = importers.load_dataset(spec, open_ended=open_ended, video=getattr(pre.images, "video", None))
    source = importers.drop_long_prompts(source, pre.prompt_len, max_prompt_len, report)
    if reports is not None:
        reports[name] = report
    log.info("data %s: %s", name, report)
    print(f"data {name}: {report}", flush=True)
    if not len(source):
        raise ValueError(f"bad config: no row of {spec} fits data.max_prompt_len={max_prompt_len}; raise it")
    return source


def _sources(c: ml_collections.ConfigDict, workdir: str, model_config, pre: Preprocess, reports: dict) -> dict:
    """The run's data sources: file datasets (`data.train`, `data.test`, `data.test_ood`) or the procedural
    task's splits."""
    d = c.data
    if d.train:
        specs = {"rl": d.train, "test": d.test, "test_ood": d.test_ood}
        learned = bool(c.reward.model or c.reward.judge)  # rows without a gold answer need a learned reward
        return {name: file_source(spec, name, pre, d.max_prompt_len, reports, learned) for name, spec in specs.items()
                if spec}
    # Procedural images are square; a dynamic-resolution (Qwen-VL) model sees them at the tasks' native 64 px.
    image_size = getattr(model_config.vision, "image_size", 64)
    tasks = {name: get_task(d.task, seed=c.seed, image_size=image_size, **options)
             for name, options in task_options(c).items()}
    splits = {"sft": ("train", d.sft_examples, 0), "val": ("validation", d.val_examples, 0),
              "rl": ("train", d.rl_examples, d.sft_examples), "test": ("test", d.test_examples, 0),
              "test_ood": ("test_ood", d.ood_examples, 0)}
    return {name: _source(c, workdir, tasks["sft" if name in ("sft", "val") else "rl"], *split)
            for name, split in splits.items()}


def task_options(c: ml_collections.ConfigDict) -> dict[str, dict]:
    """The procedural task's options for the cold start's sources (`sft`, with `val`) and the others (`rl`, with
    `test`, `test_ood`): for digits, `num_digits` from `data.num_digits`; other tasks take none.

    Raises:
      ValueError: `data.num_digits` changed for another task or for TFDS data (built with the default counts),
        or a malformed range.
    """
    from rftjax.data.tasks.digits import NUM_DIGITS, parse_range

    n = {k: parse_range(v) for k, v in c.data.num_digits.items()}
    default = {"sft": NUM_DIGITS["train"], "rl": NUM_DIGITS["train"], "test": NUM_DIGITS["test"],
               "test_ood": NUM_DIGITS["test_ood"]}
    if n == default:
        return {"sft": {}, "rl": {}}
    if c.data.task != "digits" or c.data.source != "procedural":
        raise ValueError(f"bad config: data.num_digits={c.data.num_digits.to_dict()} applies to data.task=digits with "
                         f"data.source=procedural only (TFDS data is built with the default counts)")
    return {"sft": {"num_digits": {"train": n["sft"], "validation": n["sft"]}},
            "rl": {"num_digits": {"train": n["rl"], "test": n["test"], "test_ood": n["test_ood"]}}}


def build_run(config: ml_collections.ConfigDict, workdir: str) -> Run:
    """The `Run` of `config` in `workdir` (created). Calls `jax.distributed.initialize()` first when
    `config.mesh.distributed`.

    Raises:
      ValueError: a config that cannot work (see `validate_config`), a tokenizer that does not fit the model,
        a `data.max_prompt_len` too short for the chat template and the image tokens, a dataset without a row
        that fits.
    """
    c = config
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    if c.mesh.distributed and not jax.distributed.is_initialized():
        sharding.initialize_distributed(c.mesh.coordinator_address, c.mesh.num_processes, c.mesh.process_id)
    mesh = sharding.make_mesh(c.mesh.data, c.mesh.fsdp, c.mesh.tensor, jax.devices()[: c.mesh.num_devices or None])
    algo = configs.algorithm(c)
    validate_config(c, mesh.shape["data"] * mesh.shape["fsdp"], algo)
    model_config = model_config_of(c)
    rollout_config = rollout_config_of(c, algo, model_config)
    tokenizer = tokenizer_of(c, model_config)
    reward = rewards_of(c, rewards.SourceContext(sharding.Placement(mesh), model_config, tokenizer,
                                                 c.rl.max_new_tokens))
    if c.data.augment and not family_of(model_config).augmentable:
        raise ValueError(f"bad config: data.augment works on square LLaVA images; set data.augment='' for "
                         f"{family_of(model_config).name}")
    parse_augment(c.data.augment)  # a bad spec fails here, not after the model is built
    d, images = c.data, media_input_of(c, model_config)
    extra = reward_models.extra_media(reward, getattr(images, "video", None))
    prompt_pre = Preprocess(tokenizer, images, d.max_prompt_len, extra_media=tuple(extra.items()))
    shortest = prompt_pre.prompt_len("", [(28, 28)])
    if d.max_prompt_len < shortest:
        raise ValueError(f"bad config: data.max_prompt_len={d.max_prompt_len} cannot hold the chat template with the "
                         f"image tokens of the smallest image ({shortest} tokens before any question text); raise "
                         f"data.max_prompt_len to at least {shortest + 32}")

    paths = trainable.trainable_paths(abstract_params(model_config), model_config, c.optim.freeze)
    key = jax.random.key(c.seed)  # the config is checked: now the expensive part
    params, shardings = init_params(c, model_config, mesh, key)
    log.info("model: %s, %.1fM params, mesh %s", c.model.checkpoint or c.model.preset,
             param_count(model_config) / 1e6, dict(mesh.shape))
    reports = {}
    return Run(
        config=c, workdir=workdir, mesh=mesh, model_config=model_config, algo=algo, params=params,
        param_shardings=shardings, key=key, tokenizer=tokenizer,
        sources=_sources(c, workdir, model_config, prompt_pre, reports), prompt_pre=prompt_pre,
        sft_pre=dataclasses.replace(prompt_pre, with_completion=True, max_completion_len=d.max_completion_len),
        rewards=reward, rollout_config=rollout_config,
        reports=reports, trainable_paths=frozenset(paths))


def train_iterators(run: Run):
    """`(sft_iter, rl_iter)`: the shuffled, repeating grain iterators of the SFT traces (None for file datasets,
    which have no traces) and the RL prompts, each process reading its share (checkpointable: `get_state()` /
    `set_state()`)."""
    c, d = run.config, run.config.data
    sft = None
    if "sft" in run.sources:
        sft = iter(make_dataset(run.sources["sft"], run.sft_pre, seed=c.seed, num_workers=d.num_workers,
                                **sharding.process_share(c.sft.batch_size)))
    rl_ = make_dataset(run.sources["rl"], run.prompt_pre, seed=c.seed + 1, augment=parse_augment(d.augment),
                       num_workers=d.num_workers, **sharding.process_share(c.rl.prompts_per_step))
    return sft, iter(rl_)
