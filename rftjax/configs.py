"""Defaults of every run setting (`base_config()`); files in configs/ start from it and override.

The big_vision / scenic convention: a config file defines `get_config()` returning an
`ml_collections.ConfigDict`; any field can be overridden on the command line (`--config.rl.steps=10`).
"""

from __future__ import annotations

import ml_collections


MOVED = {"dynamic_sampling": "rl", "gen_prompts_per_round": "rl", "dynamic_sampling_rounds": "rl",
         "overlong_buffer_len": "reward"}
"""Settings that left the objective (`rl.algo.NAME`) for the rollout schedule or the reward shaping: NAME ->
its section (`rl.NAME`, `reward.NAME`). The old keys still work, with a deprecation warning."""
_WARNED: set[str] = set()  # deprecated keys already warned about in this process


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0

    c.model = ml_collections.ConfigDict()
    c.model.preset = "default"          # rftjax.models.PRESETS: tiny | default (~19M) | large
    c.model.dtype = "auto"              # compute dtype: auto (bfloat16 on TPU/GPU and on CPUs whose bf16 matmul is
                                        # faster, measured once and cached; else float32) | float32 | bfloat16
    c.model.overrides = model_override_fields()  # the model config's fields, e.g. {"vision": {"patch_size": 16}}
    c.model.checkpoint = ""             # an HF directory (LLaVA, Qwen2-VL, Qwen2.5-VL, Qwen3-VL): weights, tokenizer.json
                                        # and chat template instead of the preset, random init and packaged tokenizer
    c.model.lora = ml_collections.ConfigDict()  # LoRA adapters (rftjax.models.lora, via qwix); rank 0 = off
    c.model.lora.rank = 0               # r; > 0 turns LoRA on: only the adapters train, the base weights are frozen
    c.model.lora.alpha = 32.0           # adapter output scale alpha / r (PEFT lora_alpha)
    c.model.lora.dropout = 0.0          # on the adapters' inputs, in training forward passes only
    c.model.lora.targets = "decoder"    # decoder | decoder+vision | vision | a module-path regex (re.fullmatch)

    c.data = ml_collections.ConfigDict()
    c.data.task = "digits"              # digits | shapes | grounding | describe (open-ended: reward.model/judge) |
    #                                     motion (videos, Qwen-VL models: data.video, model.overrides.max_media_items)
    c.data.train = ""                   # a dataset file instead of the task: easyr1:PATH.(jsonl|parquet) or
    #                                     videor1:PATH.(json|jsonl) (RL prompts)
    c.data.test = ""                    # ... its held-out evaluation set: easyr1:PATH or mathv:PATH (MATH-V jsonl)
    c.data.test_ood = ""                # ... an optional second evaluation set
    c.data.source = "procedural"        # procedural (rendered on the fly) | tfds (array_record under data_dir)
    c.data.data_dir = ""                # TFDS data dir (default WORKDIR/tfds)
    c.data.max_prompt_len = 112         # P: prompts are left-padded to it; longer task prompts raise, longer
                                        # dataset rows are dropped (counted in the data report)
    c.data.max_completion_len = 64      # C: SFT targets are cut/padded to it
    c.data.sft_examples = 2000          # traced training examples for the cold start (train split 0..n-1)
    c.data.val_examples = 200           # validation split, for the SFT early stopping
    c.data.rl_examples = 50000          # answer-only training problems for RL (train split, after the SFT ones)
    c.data.test_examples = 500          # held-out test problems (digit images never seen in training)
    c.data.ood_examples = 300           # out-of-distribution test problems
    c.data.num_digits = ml_collections.ConfigDict({  # digits task: digits per image, "N-M" or "N"
        "sft": "1-4",                   # cold-start traces and validation (e.g. 1-3: traces are scarce)
        "rl": "1-4", "test": "1-4",     # RL problems, test
        "test_ood": "5-6"})             # out of distribution
    c.data.chat_template_kwargs = ml_collections.ConfigDict()  # model.checkpoint's chat template switches, as
                                        # transformers' apply_chat_template(**kwargs): {"enable_thinking": False}
                                        # (Qwen3.5 answers without its <think> block)
    c.data.video = ml_collections.ConfigDict(dict(  # video frames (rftjax.data.video.VideoSampling; Qwen-VL)
        fps=2.0, min_frames=4, max_frames=16,   # sampled per second of video, within [min_frames, max_frames]
        frame_max_tokens=64))                   # the largest frame in LM tokens (per-frame pixel budget)
    c.data.augment = ""                 # "" | "noise:0.1" | "crop:0.8", applied to RL prompts (the update sees them)
    c.data.num_workers = 0              # grain worker processes

    c.sft = ml_collections.ConfigDict()
    c.sft.enabled = True
    c.sft.batch_size = 32
    c.sft.lr = 1e-3
    c.sft.warmup_steps = 50
    c.sft.max_steps = 2000
    c.sft.eval_every = 50               # validation loss every N steps ...
    c.sft.patience = 3                  # ... stop after N evaluations without improvement (keeps the best params)
    c.sft.min_delta_rel = 0.0           # an evaluation "improves" if it beats the best by this fraction
    c.sft.weight_decay = 0.01
    c.sft.max_seconds = 0.0             # > 0: a time budget; the stage ends (with its evaluation) once its wall clock
                                        # passes it (checked before each step; recorded as sft_end_reason)

    c.rl = ml_collections.ConfigDict()
    c.rl.enabled = True
    c.rl.algorithm = "grpo"             # rftjax.rl.PRESETS: grpo dr_grpo dapo gspo rloo reinforce_pp ppo
    c.rl.algo = algo_overrides()        # AlgorithmConfig overrides of the preset (group_size, kl_coef, ...)
    c.rl.steps = 200
    c.rl.prompts_per_step = 8           # B prompts per step; N = B * group_size completions
    c.rl.minibatch_size = 0             # rows per update; 0 = all N (one update per iteration)
    c.rl.micro_batch_size = 0           # rows per forward/backward pass (gradients summed); 0 = the minibatch
    c.rl.lr = 2e-5
    c.rl.critic_lr = 1e-4
    c.rl.warmup_steps = 0
    c.rl.weight_decay = 0.0
    c.rl.max_new_tokens = 48
    c.rl.temperature = 1.0
    c.rl.top_k = 0
    c.rl.top_p = 1.0
    # DAPO's dynamic sampling (Yu et al. 2025, Sec. 3.2); unset (None): the preset's (rftjax.rl.preset_settings)
    c.rl.dynamic_sampling = ml_collections.config_dict.placeholder(bool)  # keep only groups whose rewards differ
    c.rl.gen_prompts_per_round = ml_collections.config_dict.placeholder(int)  # prompts generated per round (verl's
                                        # gen_batch_size, a multiple of prompts_per_step); 0 = prompts_per_step
    c.rl.dynamic_sampling_rounds = ml_collections.config_dict.placeholder(int)  # rounds at most (default 4)
    c.rl.noisy_rollout = ml_collections.ConfigDict()  # NoisyRollout (Liu et al. 2025): half of each group sampled
                                        # on a distorted image, the update on the clean one (rftjax.data.augment)
    c.rl.noisy_rollout.kind = ""        # "" = off | gaussian (DDPM forward noise) | rotate (LLaVA's square images)
    c.rl.noisy_rollout.noise_step = 500  # a0 of gaussian: the DDPM step (of 1000) at the start
    c.rl.noisy_rollout.max_angle = 30.0  # a0 of rotate: degrees
    c.rl.noisy_rollout.decay_coef = 30.0  # strength a0 * (1 - sigmoid(decay_coef * (t - decay_mid_step) / rl.steps))
    c.rl.noisy_rollout.decay_mid_step = 40.0
    c.rl.max_seconds = 0.0              # > 0: the RL stage's time budget, as sft.max_seconds (rl_end_reason)
    c.rl.control_sft_seconds = 0.0      # > 0: a control run: spend this long on more SFT instead of RL
    c.rl.control_schedule = "continue"  # the control's SFT learning rate: continue the cold start's schedule where
                                        # it stopped (its annealed tail), or restart it (warm-up to sft.lr again)
    c.rl.init_from_sft = ""             # another run's workdir: start from its cold-start result (sft_checkpoint/)

    c.optim = ml_collections.ConfigDict()
    c.optim.b1 = 0.9
    c.optim.b2 = 0.99
    c.optim.grad_clip = 1.0
    c.optim.grad_accum = 1
    c.optim.lr_decay = "cosine"         # cosine | constant
    c.optim.vision_lr_scale = 1.0       # ViT learning-rate multiplier (both stages)
    c.optim.freeze = ""                 # regex (re.fullmatch on param paths such as vision_tower/layers_0/fc1/kernel)
                                        # of params that do not train: no gradient, optimizer state or reference
                                        # copy; 'vision_tower/.*' (LLaVA) or 'visual/.*' (Qwen-VL) freezes the ViT

    c.reward = ml_collections.ConfigDict()
    c.reward.accuracy_weight = 1.0
    c.reward.format_weight = 0.2
    c.reward.box_iou = True
    c.reward.answer_format = "tags"     # tags: <answer>X</answer> | boxed: \boxed{X}; the prompt asks for it
    c.reward.function = ""              # PATH.py[:NAME] (default compute_score): a user reward function instead of the
                                        # built-in ones, EasyR1's signature (rftjax.rewards.compose.RewardConfig)
    c.reward.timeout_s = 1.0            # time limit of one completion's reward; past it: 0, counted (reward_timeouts)
    c.reward.num_workers = 2            # reward worker processes (one task per completion); 0 = in this process,
                                        # without a time limit
    c.reward.on_error = "raise"         # an exception in reward.function: raise (names the row) | zero (counted)
    c.reward.overlong_buffer_len = ml_collections.config_dict.placeholder(int)  # DAPO's soft overlong punishment
                                        # over the last N tokens of rl.max_new_tokens; 0 = off; unset: the preset's
    c.reward.sources = ""               # more reward sources: PATH.py:FACTORY[:WEIGHT], comma-separated; FACTORY(
                                        # rftjax.rewards.SourceContext) -> a RewardSource (rftjax.rewards.sources)
    c.reward.aggregation = "sum_then_normalize"  # | normalize_then_sum: each source normalised per group first
    # A reward model on the mesh (docs/rewards.md): a *ForSequenceClassification dir or a body + value_head.safetensors
    c.reward.model = ""                 # DIR; "" = none
    c.reward.model_weight = 1.0
    c.reward.model_mean = 0.0           # the score enters as (score - mean) / std
    c.reward.model_std = 1.0
    c.reward.model_batch_size = 0       # rows per forward pass and process; 0 = the step's rows at once
    c.reward.model_gate = "all"         # rows it scores: all | correct (rules) | answered | unanswered (no gold answer)
    # A generative judge on the mesh: an HF VLM dir, greedy, its verdict parsed to [0, 1]
    c.reward.judge = ""                 # DIR; "" = none
    c.reward.judge_template = ""        # jinja2 FILE (question, response, answer); "" = the built-in one
    c.reward.judge_parse = "score:0:10"  # score:LOW:HIGH ("Final Score: N") | boxed:LOW:HIGH | yes:YES:NO (p(yes))
    c.reward.judge_max_new_tokens = 256
    c.reward.judge_weight = 1.0
    c.reward.judge_batch_size = 0
    c.reward.judge_gate = "all"         # e.g. correct: judge only the rows the rules mark correct (FAPO)

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1                    # -1: all devices not used by fsdp/tensor
    c.mesh.fsdp = 1
    c.mesh.tensor = 1
    c.mesh.num_devices = 0              # 0: all devices; else the first N (tests)
    c.mesh.distributed = False          # jax.distributed.initialize(): one process per host (TPU pods, multi-GPU)
    c.mesh.coordinator_address = ""     # ... "" = detected (Cloud TPU, SLURM, MPI); else HOST:PORT of process 0
    c.mesh.num_processes = 0            # ... 0 = detected
    c.mesh.process_id = -1              # ... -1 = detected

    c.eval = ml_collections.ConfigDict()
    c.eval.every = 50                   # RL steps between evaluations (also at the end of each stage)
    c.eval.batch_size = 64
    c.eval.pass_n = 4                   # pass@k: samples per problem (Chen et al.'s n; up to 64 is usual), giving the
                                        # unbiased curve pass@1..pass@n; 0 = off
    c.eval.pass_problems = 100          # ... on the first N test / OOD problems
    c.eval.pass_k = ml_collections.config_dict.placeholder(int)  # renamed: an error if set (validate_config)
    c.eval.during_rl_examples = 200     # test problems per intermediate evaluation (final: all)
    c.eval.max_new_tokens = 0           # generation budget of evaluations (longer OOD traces); 0 = rl.max_new_tokens
    c.eval.dataset = ""                 # python -m rftjax.evaluate: "mathv:PATH" | "easyr1:PATH"

    c.log = ml_collections.ConfigDict()
    c.log.samples_every = 25
    c.log.num_samples = 4
    c.log.tensorboard = True
    c.log.progress = True

    c.plan = ml_collections.ConfigDict()   # python -m rftjax.plan (memory per device, nothing allocated)
    c.plan.num_devices = 0              # devices of the planned mesh; 0 = this machine's
    c.plan.device_memory_gb = 0.0       # memory per device; 0 = this machine's first device's (else 16, a v5e chip)

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every = 50
    c.checkpoint.keep = 2
    return c


def easyr1_checkpoint_config() -> ml_collections.ConfigDict:
    """`base_config` set up for GRPO on a pretrained checkpoint (`model.checkpoint`, required) with EasyR1-format
    dataset files (`data.train`, `data.test`, required): no SFT cold start (the checkpoint is the start), EasyR1's
    Geometry3K example where it matters (GRPO with 5 samples, k3 KL at 1e-2 to the checkpoint, lr 1e-6, answers
    in `\\boxed{}`), scaled to one host. The `configs/*_easyr1.py` files start from it."""
    c = base_config()
    c.model.checkpoint = ""                     # required: an HF checkpoint directory of a supported family
    c.model.dtype = "bfloat16"                  # Qwen-VL images: at most 1024 tokens (QwenVLConfig.max_image_tokens)
    c.data.train = ""                           # required: easyr1:PATH.(jsonl|parquet)
    c.data.test = ""                            # required: easyr1:PATH or mathv:PATH
    c.data.max_prompt_len = 1024                # rows whose prompt (with image tokens) is longer are dropped
    c.sft.enabled = False
    c.rl.algorithm = "grpo"
    c.rl.algo.group_size = 5
    c.rl.algo.kl_coef = 1e-2
    c.rl.steps = 200
    c.rl.prompts_per_step = 16
    c.rl.micro_batch_size = 4                   # rows per forward/backward pass (EasyR1's micro-batch for update)
    c.rl.lr = 1e-6
    c.rl.warmup_steps = 10
    c.rl.max_new_tokens = 1024
    c.reward.answer_format = "boxed"
    c.reward.format_weight = 0.1
    c.eval.every = 25
    c.eval.batch_size = 16
    c.eval.pass_n = 0
    c.eval.during_rl_examples = 128
    c.checkpoint.every = 25
    return c


def model_override_fields() -> ml_collections.ConfigDict:
    """Every top-level bool / int / float / str field of the registered model families' configs (`param_dtype`,
    `remat`, `max_image_tokens`, `max_media_items`, ...) as an unset placeholder, so that any of them can be set
    on the command line (`--config.model.overrides.remat=True`); nested fields (`vision`, `text`) and tuples are
    set in a config file (`c.model.overrides.update(vision={"patch_size": 16})`). Unset fields (None) keep the
    preset's or checkpoint's value."""
    import dataclasses

    from rftjax.models import families

    fields = {}
    for family in families():
        for f in dataclasses.fields(family.config_cls):
            if isinstance(f.default, (bool, int, float, str)):
                fields.setdefault(f.name, type(f.default))
    return ml_collections.ConfigDict({k: ml_collections.config_dict.placeholder(t) for k, t in fields.items()})


def algo_overrides() -> ml_collections.ConfigDict:
    """Every `rftjax.rl.AlgorithmConfig` field as an unset placeholder, so that any of them can be set in a
    config file (`c.rl.algo.update(group_size=16)`) or on the command line (`--config.rl.algo.kl_coef=0.01`);
    fields left unset (None) keep the preset's value. The `MOVED` names are accepted too (deprecated)."""
    import dataclasses

    from rftjax.rl.config import SCHEDULE_DEFAULTS, AlgorithmConfig

    optional = {"float | None": float, "int | None": int}
    fields = {f.name: type(f.default) if f.default is not None else optional[f.type]
              for f in dataclasses.fields(AlgorithmConfig) if f.name != "name"}
    fields.update({k: type(SCHEDULE_DEFAULTS[k]) for k in MOVED})
    return ml_collections.ConfigDict({k: ml_collections.config_dict.placeholder(t) for k, t in fields.items()})


def algorithm(c: ml_collections.ConfigDict):
    """The run's `rftjax.rl.AlgorithmConfig` (the objective): preset `c.rl.algorithm` with the fields set in
    `c.rl.algo`; raises ValueError for an unknown preset or an invalid combination. `norm_len` (Dr.GRPO's
    constant) defaults to `c.rl.max_new_tokens`, TRL's `max_completion_length`, not to the (trimmed) length of
    each update batch."""
    from rftjax import rl

    overrides = {k: v for k, v in c.rl.algo.to_dict().items() if v is not None and k not in MOVED}
    algo = rl.get_algorithm(c.rl.algorithm, **overrides)
    return algo if algo.norm_len is not None else algo.replace(norm_len=c.rl.max_new_tokens)


def schedule(c: ml_collections.ConfigDict) -> dict:
    """The run's rollout schedule and reward shaping (`MOVED` names -> values): `rl.NAME` / `reward.NAME`, else
    the deprecated `rl.algo.NAME` (a warning naming the new key), else the preset's (`rftjax.rl.preset_settings`).

    Raises:
      ValueError: an unknown preset, or an old and a new key set to different values.
    """
    import logging

    from rftjax import rl

    out = rl.preset_settings(c.rl.algorithm)
    for name, section in MOVED.items():
        new, old = c[section].get(name), c.rl.algo.get(name)
        if old is not None:
            if name not in _WARNED:
                _WARNED.add(name)
                logging.getLogger("rftjax").warning("config rl.algo.%s is deprecated: use %s.%s", name, section,
                                                    name)
            if new is not None and new != old:
                raise ValueError(f"bad config: rl.algo.{name}={old} and {section}.{name}={new} disagree; set only "
                                 f"{section}.{name}")
            new = old
        if new is not None:
            out[name] = new
    return out


def eval_max_new_tokens(c: ml_collections.ConfigDict) -> int:
    """Tokens generated per evaluation completion: `c.eval.max_new_tokens`, or `c.rl.max_new_tokens` when 0."""
    return c.eval.max_new_tokens or c.rl.max_new_tokens


def field_parent(config: ml_collections.ConfigDict, key: str) -> tuple[ml_collections.ConfigDict, str]:
    """`(the ConfigDict holding dotted field key, its last name)`: `field_parent(c, "rl.algo.kl_coef")` ->
    `(c.rl.algo, "kl_coef")`.

    Raises:
      KeyError / AttributeError: a missing parent.
    """
    *parents, leaf = key.split(".")
    for p in parents:
        config = config[p]
    return config, leaf


def set_field(config: ml_collections.ConfigDict, key: str, value) -> None:
    """`config.a.b = value` for the dotted `key` "a.b"."""
    node, leaf = field_parent(config, key)
    node[leaf] = value


def pass_at_k_prompts(batch_size: int, pass_n: int) -> int:
    """Prompts per generation batch of the pass@k evaluation (each sampled `pass_n` times in that batch):
    `batch_size // pass_n`, at least 1."""
    return max(1, batch_size // pass_n)


def setup_logging() -> None:
    """rftjax's own INFO logs on stdout; absl/orbax chatter only from WARNING up."""
    import logging
    import sys

    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)
    log = logging.getLogger("rftjax")
    if not log.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


def run_cli(main, workdir_help: str) -> None:
    """`--config configs/NAME.py[:arg] --workdir DIR [--config.a.b=value]` -> `main(config, workdir)`, with
    `setup_logging()` done first."""
    from absl import app, flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "ml_collections config file (configs/NAME.py)")
    flags.DEFINE_string("workdir", None, workdir_help)
    flags.mark_flags_as_required(["config", "workdir"])

    def run(argv):
        setup_logging()
        main(flags.FLAGS.config, flags.FLAGS.workdir)

    app.run(run)
