"""The text tokenizer (HF `tokenizers`, byte-level BPE) and the chat template.

The packaged `assets/tokenizer.json` is a 1,024-token byte-level BPE trained on the procedural tasks' text
(questions, reasoning traces, answers) plus arithmetic and LaTeX snippets; digits are always split into
single characters (arithmetic-friendly). Byte-level means any text, of any dataset, encodes. Rebuild it,
deterministically, with `python -m rftjax.data.tokenizer build`.

Special tokens have fixed ids (the `default` model preset's `image_token_id` is 3):

  0 <pad>  1 <bos>  2 <eos>  3 <image>  4 <think>  5 </think>  6 <answer>  7 </answer>
  8 <|user|>  9 <|assistant|>

Chat template (`render_prompt`): `<|user|>` + `<image>` x num_image_tokens + `\\n` + question + `\\n` +
instruction + `<|assistant|>`; the completion is the reasoning trace followed by `<eos>`. `save_pretrained`
writes a directory `transformers.AutoTokenizer` loads, with the same template as a Jinja chat template.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
from typing import Iterable, Sequence

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from rftjax.rewards.parsing import INSTRUCTIONS

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<image>", "<think>", "</think>", "<answer>", "</answer>",
                  "<|user|>", "<|assistant|>")
PAD, BOS, EOS, IMAGE = 0, 1, 2, 3
DEFAULT_INSTRUCTION = INSTRUCTIONS["tags"]
ASSET = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "tokenizer.json")
VOCAB_SIZE = 1024
# Media placeholders users' datasets put in questions: "<image>" (EasyR1/R1-V), "<image1>" (MATH-V), "<video>".
PLACEHOLDER = re.compile(r"<image\d*>|<video>")


def placeholder_kinds(question: str) -> list[str]:
    """The media kind ("image" / "video") of each placeholder in `question`, in order."""
    return ["video" if m == "<video>" else "image" for m in PLACEHOLDER.findall(question)]


@dataclasses.dataclass(frozen=True)
class MediaSpan:
    """How one media item of a prompt appears in its tokens.

    Attributes:
      kind: "image" or "video".
      tokens: placeholder tokens the item becomes (a video with `timestamps`: the tokens of each frame block).
      timestamps: Qwen3-VL videos: seconds of each temporal patch; the video becomes one block per patch, each
        `<{t:.1f} seconds>` + `<|vision_start|>` + `tokens` video tokens + `<|vision_end|>` (transformers'
        `Qwen3VLProcessor.replace_video_token`). Empty: one block of `tokens`.
    """

    kind: str
    tokens: int
    timestamps: tuple[float, ...] = ()

    @property
    def total_tokens(self) -> int:
        """Placeholder tokens of the whole item."""
        return self.tokens * max(len(self.timestamps), 1)


def as_spans(media: int | Sequence[MediaSpan]) -> tuple[MediaSpan, ...]:
    """`media` as spans: an int n is one image of n tokens."""
    return (MediaSpan("image", int(media)),) if isinstance(media, (int, np.integer)) else tuple(media)


def spans_text(spans: Sequence[MediaSpan]) -> str:
    """`spans` as a JSON string, a batch field a model re-rendering the prompt reads back (`parse_spans`;
    `rftjax.data.pipeline.Preprocess`'s `media_spans`)."""
    return json.dumps([[s.kind, s.tokens, list(s.timestamps)] for s in spans])


def parse_spans(text: str) -> tuple[MediaSpan, ...]:
    """The spans `spans_text` wrote (floats round-trip exactly)."""
    return tuple(MediaSpan(kind, int(tokens), tuple(float(t) for t in times)) for kind, tokens, times in
                 json.loads(str(text)))


class PromptTooLongError(ValueError):
    """A prompt that does not fit `max_prompt_len` (truncating it would cut text or image tokens)."""


class TextTokenizer:
    """Wrapper around a `tokenizers.Tokenizer` with the chat template and the special ids.

    Args:
      path: a tokenizer.json (default: the packaged one).
      instruction: the line appended after each question (format instruction, `rftjax.rewards.INSTRUCTIONS`).

    `rftjax.data.chat.CheckpointTokenizer` is the same interface over a checkpoint directory's own tokenizer and
    chat template.
    """

    def __init__(self, path: str | None = None, instruction: str = DEFAULT_INSTRUCTION):
        self.path = path or ASSET
        if not os.path.exists(self.path):
            raise ValueError(f"tokenizer file {self.path} not found; build it with "
                             f"`python -m rftjax.data.tokenizer build`")
        self.tok = Tokenizer.from_file(self.path)
        for i, t in enumerate(SPECIAL_TOKENS):
            if self.tok.token_to_id(t) != i:
                raise ValueError(f"{self.path}: special token {t} must have id {i}, has {self.tok.token_to_id(t)}")
        self.instruction = instruction

    pad_id, bos_id, eos_id, image_id = PAD, BOS, EOS, IMAGE

    @property
    def eos_ids(self) -> tuple[int, ...]:
        """Ids that end a completion."""
        return (self.eos_id,)

    @property
    def never_ids(self) -> tuple[int, ...]:
        """Ids a policy must never sample besides the image placeholders: pad and BOS."""
        return (self.pad_id, self.bos_id)

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (special tokens in the text are recognised; no BOS/EOS added)."""
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`, keeping `<think>`/`<answer>` tags, dropping pad/bos/eos/image tokens."""
        drop = {PAD, BOS, EOS, IMAGE}
        return self.tok.decode([int(i) for i in ids if int(i) not in drop], skip_special_tokens=False)

    def render_prompt(self, question: str, media: int | Sequence[MediaSpan]) -> str:
        """The prompt text (chat template) with the image placeholder expanded to its tokens (`media`: the image's
        token count, or its one `MediaSpan`).

        Image placeholders inside the question (`<image>`, `<image1>`) are removed: the image block always
        comes first.

        Raises:
          ValueError: media other than one image (this template has one image slot).
        """
        spans = as_spans(media)
        if [s.kind for s in spans] != ["image"]:
            raise ValueError(f"this model's prompt holds exactly one image, got {[s.kind for s in spans]}; several "
                             f"images and videos need a Qwen-VL model")
        question = PLACEHOLDER.sub("", question).strip()
        return f"<|user|>{'<image>' * spans[0].tokens}\n{question}\n{self.instruction}<|assistant|>"

    def prompt_ids(self, question: str, media: int | Sequence[MediaSpan], max_prompt_len: int | None = None,
                   example_id: str = "") -> list[int]:
        """Token ids of the rendered prompt (`media`: an image's token count, or the `MediaSpan`s of the items in
        placeholder order).

        Raises:
          PromptTooLongError (a ValueError): the prompt is longer than `max_prompt_len`; the message names the
            prompt length, the media-token count and the config field to raise.
        """
        ids = self.encode(self.render_prompt(question, media))
        if max_prompt_len is not None and len(ids) > max_prompt_len:
            where = f" (example {example_id})" if example_id else ""
            n = sum(s.total_tokens for s in as_spans(media))
            raise PromptTooLongError(
                f"prompt{where} has {len(ids)} tokens, {n} of them image/video tokens, but "
                f"max_prompt_len={max_prompt_len}: truncating would cut through the prompt (left truncation would "
                f"cut the media tokens). Raise config data.max_prompt_len to at least {len(ids)}.")
        return ids

    def completion_ids(self, completion: str) -> list[int]:
        """Token ids of a completion (reasoning trace) followed by the EOS id."""
        return self.encode(completion) + [self.eos_id]

    def save_pretrained(self, directory: str) -> None:
        """Write tokenizer.json + tokenizer_config.json (+ chat template) for `transformers.AutoTokenizer`."""
        os.makedirs(directory, exist_ok=True)
        self.tok.save(os.path.join(directory, "tokenizer.json"))
        instruction = self.instruction.replace("'", "\\'")
        template = ("{% for m in messages %}{% if m['role'] == 'user' %}<|user|><image>\n{{ m['content'] }}\n"
                    + instruction + "<|assistant|>{% else %}{{ m['content'] }}<eos>{% endif %}{% endfor %}")
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "pad_token": "<pad>", "bos_token": "<bos>",
                  "eos_token": "<eos>", "unk_token": None, "chat_template": template, "model_max_length": 4096,
                  "clean_up_tokenization_spaces": False}
        with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
            json.dump(config, f, indent=2)


def training_corpus(n_per_task: int = 3000) -> list[str]:
    """Deterministic text the packaged tokenizer is trained on: the tasks it was built with (`describe` reuses
    `shapes`' words)."""
    from rftjax.data.tasks import TASKS

    lines: list[str] = []
    for name in ("digits", "grounding", "shapes"):
        task = TASKS[name](seed=0)
        for split in ("train", "test_ood"):
            for i in range(n_per_task if split == "train" else n_per_task // 10):
                ex = task.example(split, i)
                lines += [ex["question"], ex["reasoning"], ex["answer"]]
    lines.append(DEFAULT_INSTRUCTION)
    lines += [r"\frac{a}{b} + \sqrt{x^2} = \pi r^2, \angle ABC = 90^\circ, (A) (B) (C) (D) (E)",
              "Which of the following is correct? Choose one option. The answer is A, B, C, D or E.",
              "= + - * / ^ ( ) [ ] { } , . ; : ? ! % $ \\ _ ' \" < > | & # @ ~"]
    return lines


def build(path: str = ASSET, vocab_size: int = VOCAB_SIZE) -> Tokenizer:
    """Train the byte-level BPE on `training_corpus()` and save it to `path`."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(training_corpus(), trainer)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tok.save(path)
    return tok


def pad_left(ids: Sequence[int], length: int, pad_id: int = PAD) -> tuple[list[int], list[bool]]:
    """Left-pad `ids` to `length`: `(ids, mask)`. Raises ValueError if longer."""
    if len(ids) > length:
        raise ValueError(f"{len(ids)} tokens do not fit length {length}")
    n = length - len(ids)
    return [pad_id] * n + list(ids), [False] * n + [True] * len(ids)


def pad_right(ids: Sequence[int], length: int, pad_id: int = PAD) -> tuple[list[int], list[bool]]:
    """Right-pad (or cut) `ids` to `length`: `(ids, mask)`."""
    ids = list(ids)[:length]
    n = length - len(ids)
    return ids + [pad_id] * n, [True] * len(ids) + [False] * n


if __name__ == "__main__":
    if sys.argv[1:] == ["build"]:
        t = build()
        print(f"wrote {ASSET} ({t.get_vocab_size()} tokens)")
    else:
        print("usage: python -m rftjax.data.tokenizer build")
