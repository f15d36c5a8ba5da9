"""Learned rewards on the run's mesh: discriminative reward models and generative judges.

    RewardView ──render (its own chat template: user turn with the image + question, assistant turn) ──►
      reward model:  one forward pass, hidden state at the last real token · head ──► score [N]
      judge:         greedy generation with rftjax's sampler ──► parse (`parse_judgement`) ──► score in [0, 1]

Both read each prompt's media once (`media_of`: the policy's pixel values when the model reads images the same
way, else the copy the data pipeline made for it, `Preprocess.extra_media`; every image and video of a row), and
run jitted on the policy's mesh with their params placed in the model family's shardings (never trained, never
copied per step).

Reward-model checkpoint layouts (`load_reward_model`):
- `*ForSequenceClassification` (transformers' `GenericForSequenceClassification`, e.g.
  `Qwen3_5ForSequenceClassification`): the body's tensors plus `score.weight` `[1, D]`, no bias; transformers
  scores the last token that is not `pad_token_id`.
- A TRL-style value head beside a `*ForConditionalGeneration` body (Skywork-VL-Reward's layout):
  `value_head.safetensors` with `v_head.summary.weight` `[1, D]` and `v_head.summary.bias` `[1]`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import safetensors

from rftjax.data.tokenizer import PLACEHOLDER, MediaSpan, parse_spans
from rftjax.models import model_for
from rftjax.models.family import dummy_inputs
from rftjax.rewards.sources import check_gate

VALUE_HEAD_FILE = "value_head.safetensors"
LENGTH_MULTIPLE = 64  # reward-model and judge inputs are padded to a multiple of this many tokens (one compile each)


@dataclasses.dataclass(frozen=True)
class RewardModel:
    """A discriminative reward model: a body of a supported family and a scalar head.

    Attributes:
      config: the body's model config (`rftjax.models`); params: its params without an LM head.
      head: `{"kernel": float32 [D], "bias": float32 []}`: score = hidden · kernel + bias.
      layout: `sequence_classification` or `value_head` (the module docstring).
      path: the checkpoint directory.
    """

    config: Any
    params: dict
    head: dict
    layout: str
    path: str


def load_reward_model(path: str, **overrides) -> RewardModel:
    """The reward model of an HF checkpoint directory in either layout of the module docstring (a value-head
    file wins when both are present); `overrides` as `rftjax.models.hf.load_pretrained` (`max_image_tokens`,
    `dtype`, `scan_layers`).

    Raises:
      ValueError: neither layout, a head with more than one label, a head whose width is not the body's.
    """
    from rftjax.models import hf

    hf_config = hf.read_hf_config(path)
    value_file = os.path.join(path, VALUE_HEAD_FILE)
    if os.path.exists(value_file):
        with safetensors.safe_open(value_file, framework="numpy") as f:
            names = set(f.keys())
            if "v_head.summary.weight" not in names:
                raise ValueError(f"{value_file} has no v_head.summary.weight (tensors: {sorted(names)[:8]})")
            weight = f.get_tensor("v_head.summary.weight").astype(np.float32)
            bias = f.get_tensor("v_head.summary.bias").astype(np.float32) if "v_head.summary.bias" in names \
                else np.zeros(1, np.float32)
        layout = "value_head"
    elif any(a.endswith("ForSequenceClassification") for a in hf_config.get("architectures") or []):
        tensors = hf.read_tensors(path, {"score.weight", "score.bias"})
        if "score.weight" not in tensors:
            raise ValueError(f"{path}: a {hf_config['architectures'][0]} checkpoint without score.weight")
        weight, bias = tensors["score.weight"], tensors.get("score.bias", np.zeros(1, np.float32))
        layout = "sequence_classification"
    else:
        raise ValueError(f"{path} is not a reward model rftjax reads: give a *ForSequenceClassification checkpoint "
                         f"(score.weight) or put {VALUE_HEAD_FILE} (v_head.summary.weight, .bias) beside a "
                         f"*ForConditionalGeneration body (architectures: {hf_config.get('architectures')})")
    config, params = hf.load_body(path, **overrides)
    width = config.text.hidden_size
    if weight.shape != (1, width) or np.size(bias) != 1:
        raise ValueError(f"{path}: the {layout} head has weight {weight.shape} and bias {np.shape(bias)}; rftjax "
                         f"scores with one label: weight [1, {width}] and bias [1]")
    head = {"kernel": jnp.asarray(weight[0]), "bias": jnp.asarray(np.float32(np.ravel(bias)[0]))}
    return RewardModel(config, params, head, layout, path)


def place_params(params: dict, config, mesh) -> dict:
    """`params` (a subset of `model_for(config)`'s, e.g. without the LM head) in the family's shardings on
    `mesh` (as the policy's: `rftjax.sharding.param_shardings`); unchanged when `mesh` is None."""
    if mesh is None:
        return params
    from rftjax import sharding

    full = sharding.param_shardings(model_for(config), *dummy_inputs(config), mesh=mesh)

    def prune(tree, like):
        return {k: prune(tree[k], v) if isinstance(v, dict) else tree[k] for k, v in like.items()}

    return jax.device_put(params, prune(full, params))


def last_hidden(params, config, features, prompt_index, input_ids, attention_mask):
    """The decoder's final hidden state at each row's last real token, `[N, D]` (compute dtype).

    Args:
      params: the model's params (the LM head may be absent).
      features: the encoded images of the prompts (`encode_images`), one per prompt.
      prompt_index: int32 `[N]`, the prompt (row of `features`) of each row.
      input_ids: int32 `[N, L]`; attention_mask: bool `[N, L]` (padding on either side): the last True position
        is the token read (transformers' last non-pad token).
    """
    rows = jax.tree.map(lambda x: jnp.take(x, prompt_index, axis=0), features)
    out = model_for(config).apply({"params": params}, None, input_ids, attention_mask, image_features=rows,
                                  return_hidden=True)
    last = input_ids.shape[1] - 1 - jnp.argmax(attention_mask[:, ::-1], axis=1)
    return jnp.take_along_axis(out.hidden, last[:, None, None], axis=1)[:, 0]


def last_token_scores(params, head: dict, config, features, prompt_index, input_ids, attention_mask):
    """A reward model's score of each row, `last_hidden · kernel + bias` in float32, `[N]` (`head`:
    `RewardModel.head`; the other arguments as `last_hidden`)."""
    h = last_hidden(params, config, features, prompt_index, input_ids, attention_mask).astype(jnp.float32)
    return h @ head["kernel"] + head["bias"]


def yes_probability(params, config, features, prompt_index, input_ids, attention_mask, yes_id, no_id):
    """p(yes) / (p(yes) + p(no)) of the next token after each prompt, float32 `[N]` (a judge's `yes` rule;
    arguments as `last_hidden`, `yes_id`/`no_id` token ids)."""
    h = last_hidden(params, config, features, prompt_index, input_ids, attention_mask)
    logits = model_for(config).apply({"params": params}, h, method="head")
    return jax.nn.sigmoid(logits[:, yes_id] - logits[:, no_id])


def encode_images(params, config, pixel_values):
    """The model's image features of a batch of prompts' images (`encode_images` of its module)."""
    return model_for(config).apply({"params": params}, pixel_values, method="encode_images")


def media_of(prompts: dict, key: str = "") -> tuple[Any, list[tuple[MediaSpan, ...]]]:
    """`(pixel_values, spans)` of a prompt batch for a model reading media under `key` (`Preprocess.extra_media`;
    "" = the policy's): the pixel values as the batch holds them and each row's `MediaSpan`s in placeholder order.

    Raises:
      KeyError: the batch has no media for `key` (the pipeline was built without that model).
    """
    prefix = f"{key}_" if key else ""
    return prompts[f"{prefix}pixel_values"], [parse_spans(t) for t in prompts[f"{prefix}media_spans"]]


def pad_rows(rows: list[list[int]], pad_id: int, multiple: int = LENGTH_MULTIPLE) -> tuple[np.ndarray, np.ndarray]:
    """Token rows -> left-padded `(ids int32 [N, L], mask bool [N, L])` (`pad_left` per row), L the longest
    rounded up to `multiple`."""
    from rftjax.data.tokenizer import pad_left

    length = max(multiple, -(-max(len(r) for r in rows) // multiple) * multiple)
    ids, mask = zip(*(pad_left(r, length, pad_id) for r in rows))
    return np.asarray(ids, np.int32), np.asarray(mask, bool)


# ----------------------------------------------------------------------------------------------------------
# Judges' outputs

_SCORE = re.compile(r"final\s*score\s*[:=]?\s*\**\s*(-?\d{1,12}(?:\.\d{1,12})?)", re.IGNORECASE)
_WORDS = {"yes": 1.0, "correct": 1.0, "true": 1.0, "no": 0.0, "incorrect": 0.0, "false": 0.0}
PARSE_TAIL = 4000  # characters of a judge's output that parsing reads (its end, where the verdict is)


@dataclasses.dataclass(frozen=True)
class ParseRule:
    """How a judge's verdict becomes a reward in [0, 1].

    Attributes:
      kind: `score` (the last `Final Score: N`, N in [low, high] mapped to (N - low) / (high - low)), `boxed` (the
        last `\\boxed{N}` mapped so, or `\\boxed{yes|correct|true}` = 1, `no|incorrect|false` = 0), `yes` (the
        probability of the `yes` token against the `no` token at the first generated position,
        p(yes) / (p(yes) + p(no)): no generation).
      low, high: the verdict's range (`score`, `boxed`); yes, no: the two tokens' texts (`yes`).

    Raises:
      ValueError: an unknown kind, an empty range, missing tokens.
    """

    kind: str = "score"
    low: float = 0.0
    high: float = 10.0
    yes: str = "Yes"
    no: str = "No"

    @classmethod
    def parse(cls, spec: str) -> "ParseRule":
        """`score:LOW:HIGH` | `boxed:LOW:HIGH` | `yes:YES:NO` (defaults `score:0:10`, `boxed:0:1`, `yes:Yes:No`).

        Raises:
          ValueError: another form (says which are accepted).
        """
        kind, *args = spec.split(":")
        try:
            if kind in ("score", "boxed"):
                low, high = (float(a) for a in args) if args else ((0.0, 10.0) if kind == "score" else (0.0, 1.0))
                return cls(kind, low, high)
            if kind == "yes":
                return cls(kind, yes=args[0], no=args[1]) if args else cls(kind)
        except (ValueError, IndexError):
            pass
        raise ValueError(f"judge parse rule {spec!r}: write score:LOW:HIGH, boxed:LOW:HIGH or yes:YES_TOKEN:NO_TOKEN")

    def __post_init__(self):
        if self.kind not in ("score", "boxed", "yes"):
            raise ValueError(f"judge parse kind {self.kind!r}: choose score, boxed or yes")
        if not (math.isfinite(self.low) and math.isfinite(self.high) and self.high > self.low):
            raise ValueError(f"judge score range [{self.low}, {self.high}] must be finite with high > low")
        if self.kind == "yes" and not (self.yes and self.no and self.yes != self.no):
            raise ValueError(f"judge yes/no tokens {self.yes!r}/{self.no!r} must be two different texts")


def parse_judgement(text, rule: ParseRule) -> float | None:
    """The reward in [0, 1] of a judge's output under `rule` (`score` or `boxed`), or None when it has no verdict
    in range (scored 0 and counted by `JudgeSource`). Reads the last `PARSE_TAIL` characters with linear-time
    patterns; never raises on model output."""
    from rftjax.rewards.parsing import extract_boxed

    if not isinstance(text, str):
        return None
    tail = text[-PARSE_TAIL:]
    if rule.kind == "score":
        found = _SCORE.findall(tail)
        value = found[-1] if found else None
    else:
        value = extract_boxed(tail)
        if value is not None and value.strip().lower() in _WORDS:
            return _WORDS[value.strip().lower()]
    try:
        x = float(value) if value is not None else math.nan
    except ValueError:
        return None
    if not (math.isfinite(x) and rule.low <= x <= rule.high):
        return None
    return (x - rule.low) / (rule.high - rule.low)


# ----------------------------------------------------------------------------------------------------------
# Sources


DEFAULT_JUDGE_TEMPLATE = """Judge the response to the question about the image.
Question: {{ question }}
{% if answer %}Reference answer: {{ answer }}
{% endif %}Response: {{ response }}
Rate the response from 0 (wrong or unhelpful) to 10 (correct and well reasoned). End with "Final Score: N"."""
"""The judge prompt of `JudgeConfig(template="")` (jinja2; variables `question`, `response`, `answer`)."""


@dataclasses.dataclass(frozen=True)
class ModelRewardConfig:
    """A discriminative reward model source (`reward.model*`).

    Attributes:
      path: the checkpoint directory (`load_reward_model`).
      weight: its weight in the total (`rftjax.rewards.Rewards`).
      mean, std: the score enters as (score - mean) / std (std > 0): the model's scale on the rules'.
      batch_size: rows per forward pass and process (0: all the step's rows in one pass).
      gate: the rows it scores (`Rewards`): `all`, `correct` (the rules' `correct` >= 0.5), `answered` (rows with a
        gold answer), `unanswered` (without one); the others get 0.

    Raises:
      ValueError: std <= 0, batch_size < 0, an unknown gate.
    """

    path: str
    weight: float = 1.0
    mean: float = 0.0
    std: float = 1.0
    batch_size: int = 0
    gate: str = "all"

    def __post_init__(self):
        if not self.std > 0 or self.batch_size < 0:
            raise ValueError(f"reward.model_std={self.std} must be > 0 and reward.model_batch_size="
                             f"{self.batch_size} >= 0")
        check_gate(self.gate, "reward.model_gate")


@dataclasses.dataclass(frozen=True)
class JudgeConfig:
    """A generative judge source (`reward.judge*`).

    Attributes:
      path: an HF checkpoint directory of a supported family (with its tokenizer and chat template).
      template: a jinja2 file of the judge's question (variables `question`, `response`, `answer`; "" =
        `DEFAULT_JUDGE_TEMPLATE`); it is sent as one user turn with the prompt's image.
      parse: the verdict's rule (`ParseRule.parse`): `score:LOW:HIGH`, `boxed:LOW:HIGH`, `yes:YES:NO`.
      max_new_tokens: the judge's greedy budget (bounded: its verdict must come within it).
      weight, batch_size, gate: as `ModelRewardConfig`.

    Raises:
      ValueError: a template file that does not exist, a bad parse rule, max_new_tokens < 1, a bad gate.
    """

    path: str
    template: str = ""
    parse: str = "score:0:10"
    max_new_tokens: int = 256
    weight: float = 1.0
    batch_size: int = 0
    gate: str = "all"

    def __post_init__(self):
        ParseRule.parse(self.parse)
        if self.template and not os.path.isfile(self.template):
            raise ValueError(f"reward.judge_template={self.template!r} is not a file")
        if self.max_new_tokens < 1 or self.batch_size < 0:
            raise ValueError(f"reward.judge_max_new_tokens={self.max_new_tokens} must be >= 1 and "
                             f"reward.judge_batch_size={self.batch_size} >= 0")
        check_gate(self.gate, "reward.judge_gate")

    def template_source(self) -> str:
        """The jinja2 source of the judge's question."""
        if not self.template:
            return DEFAULT_JUDGE_TEMPLATE
        with open(self.template, encoding="utf-8") as f:
            return f.read()


class MeshModel:
    """A model that reads the step's completions on the run's mesh: its params placed in their shardings, its
    checkpoint tokenizer, each prompt's image encoded once per `score`, rows run in chunks every process agrees on.

    Args:
      config, params: the model (params may lack the LM head).
      tokenizer: its `rftjax.data.chat.CheckpointTokenizer` (instruction "").
      place: the run's `rftjax.sharding.Placement`.
      media_key: where the prompt batch holds the images it reads (`media_of`).
      batch_size: rows per call and process (0: all).
    """

    def __init__(self, config, params, tokenizer, place, media_key: str = "", batch_size: int = 0):
        self.config, self.tokenizer, self.place = config, tokenizer, place
        self.media_key, self.batch_size = media_key, batch_size
        self.params = place_params(params, config, place.mesh)
        self._encode = jax.jit(lambda p, pixels: encode_images(p, config, pixels))

    def clean(self, text: str) -> str:
        """Model output without media placeholders (`<image>`, `<video>`, the checkpoint's image and video token
        texts): rendering one would add a media item the batch does not have."""
        for token in (self.tokenizer.image_token, getattr(self.tokenizer, "video_token", None)):
            text = text.replace(token, "") if token else text
        return PLACEHOLDER.sub("", text)

    def media(self, view) -> tuple[Any, Any, list]:
        """`(global pixel values, their features, each prompt's MediaSpans)` of the view's prompts."""
        pixels, spans = media_of(view.prompts, self.media_key)
        placed = self.place.put(pixels)
        return placed, self._encode(self.params, placed), spans

    def run(self, fn, rows: list[list[int]], prompt_index: np.ndarray, num_prompts: int, filler: list[int]):
        """`fn(index int32 [n], ids int32 [n, L], mask bool [n, L])` (global device arrays, index into the
        global prompt batch) over this process's `rows` in chunks, the results (host pytrees) of the real rows
        concatenated. Every process makes the same number of calls of the same row count, padded with `filler`
        (a row of this process's first prompt, with its image tokens)."""
        mesh = self.place.mesh
        multiple = 1 if mesh is None else max(1, mesh.shape["data"] * mesh.shape["fsdp"] // jax.process_count())
        largest = max(1, int(np.max(self.place.gather(np.asarray([len(rows)])))))
        per_call = -(-(self.batch_size or largest) // multiple) * multiple
        first = jax.process_index() * num_prompts
        outs = []
        for start in range(0, largest, per_call):
            part = rows[start:start + per_call]
            ids, mask = pad_rows(part + [filler] * (per_call - len(part)), self.tokenizer.pad_id)
            index = np.full(per_call, first, np.int32)
            index[:len(part)] = first + np.asarray(prompt_index[start:start + len(part)], np.int32)
            got = self.place.local(fn(*self.place.put((index, ids, mask))))
            outs.append(jax.tree.map(lambda x, n=len(part): np.asarray(x)[:n], got))
        return jax.tree.map(lambda *xs: np.concatenate(xs), *outs)

    def close(self) -> None:
        pass


class RewardModelSource(MeshModel):
    """A discriminative reward model (`load_reward_model`) as a reward source: component `model` (logged as
    `reward_model_mean`), `(score - mean) / std` of each completion, the score read at the last token of the
    model's own chat-template rendering of the prompt (with its media) and the completion
    (`CheckpointTokenizer.render_prompt(response=)`).
    Source: the reward-model scoring of TRL's `GRPOTrainer` (sequence-classification models) and verl's reward
    model worker, with the image the policy saw."""

    name = "model"
    components = ("model",)
    total = "model"

    def __init__(self, model: RewardModel, tokenizer, settings: ModelRewardConfig, place, media_key: str = ""):
        super().__init__(model.config, model.params, tokenizer, place, media_key, settings.batch_size)
        self.settings, self.head = settings, model.head
        config = model.config
        self._fn = jax.jit(lambda p, h, f, i, ids, m: last_token_scores(p, h, config, f, i, ids, m))

    def score(self, view) -> dict[str, np.ndarray]:
        _, features, spans = self.media(view)
        questions = view.prompts["question"]
        rows = [self.tokenizer.encode(self.tokenizer.render_prompt(questions[b], spans[b], response=self.clean(t)))
                for t, b in zip(view.texts, view.prompt_index)]
        filler = self.tokenizer.encode(self.tokenizer.render_prompt("", spans[0], response=""))
        scores = self.run(lambda i, ids, m: self._fn(self.params, self.head, features, i, ids, m), rows,
                          view.prompt_index, len(questions), filler)
        s = self.settings
        return {"model": ((np.asarray(scores, np.float32) - s.mean) / s.std).astype(np.float32)}


class JudgeSource(MeshModel):
    """A generative judge as a reward source: components `judge` (in [0, 1]) and `judge_unparsed` (1 where the
    output had no verdict in range: scored 0). Each completion becomes one user turn (the prompt's image and
    `JudgeConfig.template` rendered with its question, the completion and the gold answer) under the judge's chat
    template; the judge answers greedily with rftjax's sampler within `max_new_tokens` and `parse_judgement` reads
    the verdict, or (`yes` rule) one forward pass gives p(yes) / (p(yes) + p(no)) of its first token.
    Source: LLM-as-a-judge rewards (verl's generative reward models; FAPO's flawed-positive judge)."""

    name = "judge"
    components = ("judge", "judge_unparsed")
    total = "judge"

    def __init__(self, config, params, tokenizer, settings: JudgeConfig, place, media_key: str = ""):
        import jinja2.sandbox

        from rftjax import sampling
        from rftjax.models import placeholder_ids

        super().__init__(config, params, tokenizer, place, media_key, settings.batch_size)
        self.settings, self.rule = settings, ParseRule.parse(settings.parse)
        self.template = jinja2.sandbox.ImmutableSandboxedEnvironment().from_string(settings.template_source())
        self.sampling = sampling.SamplingParams(
            greedy=True, max_new_tokens=settings.max_new_tokens, eos_ids=tokenizer.eos_ids, pad_id=tokenizer.pad_id,
            suppress_ids=placeholder_ids(config) + tokenizer.never_ids)
        if self.rule.kind == "yes":
            ids = [tokenizer.encode(t) for t in (self.rule.yes, self.rule.no)]
            if any(len(i) != 1 for i in ids):
                raise ValueError(f"judge yes/no texts {self.rule.yes!r}/{self.rule.no!r} must each be one token of "
                                 f"{tokenizer.path}; they are {ids}")
            yes, no = ids[0][0], ids[1][0]
            self._yes = jax.jit(lambda p, f, i, t, m: yes_probability(p, config, f, i, t, m, yes, no))
        self._generate = functools.partial(sampling.generate, params=self.sampling)

    def score(self, view) -> dict[str, np.ndarray]:
        pixels, features, spans = self.media(view)
        questions = view.prompts["question"]
        rows = [self.tokenizer.prompt_ids(
            self.template.render(question=questions[b], response=self.clean(t), answer=view.answers[n]),
            spans[b]) for n, (t, b) in enumerate(zip(view.texts, view.prompt_index))]
        filler = self.tokenizer.prompt_ids("", spans[0])
        if self.rule.kind == "yes":
            p = self.run(lambda i, ids, m: self._yes(self.params, features, i, ids, m), rows, view.prompt_index,
                         len(questions), filler)
            return {"judge": np.asarray(p, np.float32), "judge_unparsed": np.zeros(len(rows), np.float32)}
        key = jax.random.key(0)  # greedy: the key is not used

        def generate(i, ids, m):
            media = jax.tree.map(lambda x: jnp.take(x, i, axis=0), pixels)
            out = self._generate(self.params, self.config, media, ids, m, key)
            return {"ids": out.completion_ids, "lengths": out.lengths}

        out = self.run(generate, rows, view.prompt_index, len(questions), filler)
        verdicts = [parse_judgement(self.tokenizer.decode(ids[:n]), self.rule)
                    for ids, n in zip(out["ids"], out["lengths"])]
        return {"judge": np.asarray([0.0 if v is None else v for v in verdicts], np.float32),
                "judge_unparsed": np.asarray([v is None for v in verdicts], np.float32)}


def load_overrides(policy_config) -> dict:
    """The config fields a reward model or judge takes from the policy's config: its compute dtype, and its media
    budgets (`max_image_tokens`, `max_media_items`) when the policy has them."""
    out = {"dtype": policy_config.dtype}
    for name in ("max_image_tokens", "max_media_items"):
        if hasattr(policy_config, name):
            out[name] = getattr(policy_config, name)
    return out


def _checkpoint_parts(path: str, config, context, key: str) -> dict:
    """The tokenizer (instruction "") of checkpoint `path` and the media key its model reads (`key` when its
    image input differs from the policy's, else "": it reads the policy's pixel values)."""
    from rftjax.data.chat import CheckpointTokenizer
    from rftjax.data.pipeline import image_input_for

    same = image_input_for(config) == image_input_for(context.model_config)
    return {"tokenizer": CheckpointTokenizer.for_model(path, config),
            "place": context.place, "media_key": "" if same else key}


def reward_model_source(settings: ModelRewardConfig, context) -> RewardModelSource:
    """The `RewardModelSource` of `settings` for a run (`rftjax.rewards.SourceContext`: its mesh and policy).

    Raises:
      ValueError: the checkpoint is not a reward model (`load_reward_model`) or has no tokenizer/chat template.
    """
    model = load_reward_model(settings.path, **load_overrides(context.model_config))
    return RewardModelSource(model, settings=settings, **_checkpoint_parts(settings.path, model.config, context,
                                                                          "reward_model"))


def judge_source(settings: JudgeConfig, context) -> JudgeSource:
    """The `JudgeSource` of `settings` for a run (as `reward_model_source`).

    Raises:
      ValueError: an unreadable checkpoint, no tokenizer/chat template, yes/no texts that are not one token each.
    """
    from rftjax.models import hf

    config, params = hf.load_pretrained(settings.path, **load_overrides(context.model_config))
    return JudgeSource(config, params, settings=settings, **_checkpoint_parts(settings.path, config, context, "judge"))


def extra_media(reward, video=None) -> dict:
    """`{media key: image input}` of the sources of `reward` (`Rewards`) that read images differently from the
    policy (`Preprocess.extra_media`), sampling videos as `video` (`rftjax.data.video.VideoSampling`, the
    policy's; None: the default)."""
    from rftjax.data.pipeline import image_input_for

    return {s.media_key: image_input_for(s.config, video) for s, _, _ in reward.sources
            if isinstance(s, MeshModel) and s.media_key}
