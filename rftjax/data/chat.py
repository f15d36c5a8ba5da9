"""A checkpoint directory's own tokenizer and chat template: prompts as the model was trained to see them.

    tok = CheckpointTokenizer("path/to/Qwen2.5-VL-3B-Instruct", image_token_id=151655)
    ids = tok.prompt_ids("<image>Find x in the triangle.", num_image_tokens=391, max_prompt_len=1024)

- `tokenizer.json` is read with HF `tokenizers`; special tokens and the chat template with its `jinja2` source
  come from `chat_template.jinja`, `chat_template.json` (processor layout) or `tokenizer_config.json`, in that
  order, as transformers looks for them; EOS ids from `generation_config.json` when present.
- `render_chat` renders a template the way `transformers`' `apply_chat_template` does (sandboxed Jinja with
  `trim_blocks`, `lstrip_blocks`, loop controls, `raise_exception`, `strftime_now`, an unescaped `tojson`
  and `{% generation %}` blocks; the special tokens are template variables).
- `user_message` builds the user turn as EasyR1 does: the question is split at its media placeholders
  (`<image>`, MATH-V's `<image1>`, `<video>`) and the i-th item goes where the i-th placeholder was, never left
  as literal text; a question without placeholders gets its items first. The format instruction
  (`rftjax.rewards.INSTRUCTIONS`) follows the text.
- The rendered template holds one placeholder per item (Qwen: `<|vision_start|><|image_pad|><|vision_end|>`,
  `<|vision_start|><|video_pad|><|vision_end|>`; LLaVA: `<image>`); like the HF processors, `prompt_ids` repeats
  each item's token its `MediaSpan.tokens` times (Qwen3-VL videos: one timestamped block per temporal patch).
"""

from __future__ import annotations

import datetime
import json
import os
from typing import Iterable

import jinja2
import jinja2.ext
import jinja2.sandbox
from tokenizers import Tokenizer

import re
from typing import Sequence

from rftjax.data.tokenizer import PLACEHOLDER, MediaSpan, TextTokenizer, as_spans, placeholder_kinds
from rftjax.rewards.parsing import INSTRUCTIONS


class _Generation(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (HF's assistant-mask marker) renders its body unchanged."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


def _raise(message):
    raise jinja2.exceptions.TemplateError(message)


def compile_template(source: str) -> jinja2.Template:
    """A chat template compiled in the environment transformers uses (see the module docstring)."""
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                       extensions=[_Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
    env.globals.update(raise_exception=_raise, strftime_now=lambda f: datetime.datetime.now().strftime(f))
    return env.from_string(source)


def render_chat(template: jinja2.Template, messages: list[dict], special_tokens: dict[str, str] | None = None,
                add_generation_prompt: bool = True, template_kwargs: dict | None = None) -> str:
    """The text of `messages` (`[{"role", "content"}]`, content a string or a list of `{"type": "text"|"image"}`
    parts) under `template`, as `tokenizer.apply_chat_template(messages, tokenize=False, **template_kwargs)`
    renders it (`template_kwargs`: the template's own switches, e.g. Qwen3.5's `enable_thinking=False`)."""
    return template.render(messages=messages, add_generation_prompt=add_generation_prompt, tools=None,
                           documents=None, **(special_tokens or {}), **(template_kwargs or {}))


def user_message(question: str, instruction: str = "", kinds: Sequence[str] = ("image",)) -> dict:
    """The user turn of `question` with media items of `kinds` ("image" / "video", in order), split at its
    placeholders as EasyR1 does (see the module docstring), `instruction` appended to the text on its own line.

    Raises:
      ValueError: placeholders that do not match the items (count, or an `<image>` where the item is a video).
    """
    pieces, marks = PLACEHOLDER.split(question), placeholder_kinds(question)
    if not marks:
        marks, pieces = list(kinds), [""] * len(kinds) + [question]
    if marks != list(kinds):
        raise ValueError(f"the question's placeholders {PLACEHOLDER.findall(question)} do not match its media items "
                         f"{list(kinds)}: put one <image> (or <imageN>) per image and one <video> per video, in order")
    pieces[-1] = pieces[-1].strip() + (f"\n{instruction}" if instruction else "")
    content = []
    for i, text in enumerate(pieces):
        if text.strip():
            content.append({"type": "text", "text": text.strip()})
        if i < len(kinds):
            content.append({"type": kinds[i]})
    return {"role": "user", "content": content}


def _token_text(value) -> str | None:
    """A special token of tokenizer_config.json: a string or an AddedToken dict `{"content": ...}`."""
    return value.get("content") if isinstance(value, dict) else value


def _read_json(path: str) -> dict:
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def read_chat_template(directory: str) -> str:
    """The chat template source of a checkpoint directory (see the module docstring for the search order).

    Raises:
      ValueError: the directory has none (say which files were looked at).
    """
    jinja_file = os.path.join(directory, "chat_template.jinja")
    if os.path.exists(jinja_file):
        with open(jinja_file, encoding="utf-8") as f:
            return f.read()
    for name in ("chat_template.json", "tokenizer_config.json"):
        template = _read_json(os.path.join(directory, name)).get("chat_template")
        if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}]
            template = {t.get("name"): t.get("template") for t in template}.get("default")
        if template:
            return template
    raise ValueError(f"{directory} has no chat template (looked in chat_template.jinja, chat_template.json and "
                     f"tokenizer_config.json's 'chat_template'); add one, or use an instruct checkpoint")


class CheckpointTokenizer(TextTokenizer):
    """The tokenizer and chat template of an HF checkpoint directory, with `TextTokenizer`'s interface.

    Args:
      directory: holds `tokenizer.json` and a chat template (see the module docstring).
      image_token_id: the model's image placeholder id (`config.image_token_id`); its token text is what the
        rendered template contains once per image.
      video_token_id, vision_start_id, vision_end_id: the video placeholder and the ids around each vision block
        (videos need the first; Qwen3-VL's timestamped frames all three). None: prompts without videos.
      instruction: the format instruction appended to each question.
      eos_ids: ids that end a completion; default `generation_config.json`'s `eos_token_id`, else the
        tokenizer's `eos_token`.
      template_kwargs: extra variables of every rendering (transformers' `apply_chat_template(**kwargs)`), e.g.
        `{"enable_thinking": False}` for Qwen3.5's template, whose generation prompt otherwise opens `<think>`.

    Raises:
      ValueError: no tokenizer.json, no chat template, an image id the tokenizer does not know, no EOS token.
    """

    def __init__(self, directory: str, image_token_id: int, instruction: str = INSTRUCTIONS["tags"],
                 eos_ids: Iterable[int] | None = None, template_kwargs: dict | None = None,
                 video_token_id: int | None = None, vision_start_id: int | None = None,
                 vision_end_id: int | None = None):
        self.path = os.path.join(directory, "tokenizer.json")
        if not os.path.exists(self.path):
            raise ValueError(f"{directory} has no tokenizer.json (HF fast tokenizer); save the checkpoint's "
                             f"tokenizer with transformers (AutoTokenizer.from_pretrained(...).save_pretrained)")
        self.tok = Tokenizer.from_file(self.path)
        self.instruction = instruction
        self.template_kwargs = dict(template_kwargs or {})
        config = _read_json(os.path.join(directory, "tokenizer_config.json"))
        names = ("bos_token", "eos_token", "pad_token", "unk_token")
        self.special_tokens = {k: _token_text(config.get(k)) for k in names}
        self.template = compile_template(read_chat_template(directory))
        self.image_token = self.tok.id_to_token(image_token_id)
        if self.image_token is None:
            raise ValueError(f"image_token_id={image_token_id} is not a token of {self.path}")
        self.image_id = int(image_token_id)
        self.video_token, self.vision_start, self.vision_end = (
            None if i is None else self.tok.id_to_token(int(i)) for i in (video_token_id, vision_start_id,
                                                                           vision_end_id))
        ids = {k: self.tok.token_to_id(v) if v else None for k, v in self.special_tokens.items()}
        if eos_ids is None:
            eos = _read_json(os.path.join(directory, "generation_config.json")).get("eos_token_id", ids["eos_token"])
            eos_ids = eos if isinstance(eos, list) else [eos]
        self._eos_ids = tuple(int(i) for i in eos_ids if i is not None)
        if not self._eos_ids:
            raise ValueError(f"{directory}: no EOS token (tokenizer_config.json eos_token or generation_config.json "
                             f"eos_token_id)")
        self.eos_id = self._eos_ids[0]
        self.pad_id = ids["pad_token"] if ids["pad_token"] is not None else self.eos_id
        self.bos_id = ids["bos_token"]

    @classmethod
    def for_model(cls, directory: str, config, instruction: str = "", template_kwargs: dict | None = None):
        """The tokenizer of checkpoint `directory` with the placeholder ids of its model `config` (image; video
        and the vision block ids where the family has them)."""
        return cls(directory, config.image_token_id, instruction, template_kwargs=template_kwargs,
                   video_token_id=getattr(config, "video_token_id", None),
                   vision_start_id=getattr(config, "vision_start_token_id", None),
                   vision_end_id=getattr(config, "vision_end_token_id", None))

    @property
    def eos_ids(self) -> tuple[int, ...]:
        return self._eos_ids

    @property
    def never_ids(self) -> tuple[int, ...]:
        """Pad and BOS unless they also end a completion (Qwen pads with `<|endoftext|>`, an EOS)."""
        return tuple(i for i in (self.pad_id, self.bos_id) if i is not None and i not in self._eos_ids)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids` without special tokens (EOS, pad, image and chat-control tokens)."""
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def render_messages(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """`render_chat` with this checkpoint's template and special tokens."""
        specials = {k: v for k, v in self.special_tokens.items() if v is not None}
        return render_chat(self.template, messages, specials, add_generation_prompt, self.template_kwargs)

    def render_prompt(self, question: str, media: int | Sequence[MediaSpan], response: str | None = None) -> str:
        """The chat-template text of one user turn (`user_message`) plus the generation prompt, each media
        placeholder expanded to its item's tokens (`media`: one image's token count, or the items' `MediaSpan`s
        in placeholder order; as the HF processors expand them); with `response`, the user turn and the
        assistant turn `response` instead (no generation prompt: what a reward model reads, as
        `apply_chat_template([user, assistant], add_generation_prompt=False)`).

        Raises:
          ValueError: the template did not render one placeholder per item, or a video for a tokenizer made
            without `video_token_id` (or, with timestamps, without the vision start/end ids).
        """
        spans = as_spans(media)
        if any(s.kind == "video" for s in spans) and (self.video_token is None or any(
                s.timestamps for s in spans) and None in (self.vision_start, self.vision_end)):
            raise ValueError("a prompt with a video needs CheckpointTokenizer(video_token_id=...) (and, for "
                             "timestamped frames, vision_start_id and vision_end_id)")
        messages = [user_message(question, self.instruction, [s.kind for s in spans])]
        if response is not None:
            messages.append({"role": "assistant", "content": response})
        text = self.render_messages(messages, add_generation_prompt=response is None)
        tokens = {"image": self.image_token, "video": self.video_token}
        alternatives = [re.escape(t) for t in tokens.values() if t is not None]
        if self.vision_start is not None and self.video_token is not None and self.vision_end is not None:
            alternatives.insert(0, re.escape(self.vision_start + self.video_token + self.vision_end))
        found = re.findall("|".join(alternatives), text)
        want = [s.kind for s in spans]
        if [("image" if f == self.image_token else "video") for f in found] != want:
            raise ValueError(f"the chat template rendered placeholders {found} for media items {want}; is "
                             f"image_token_id (video_token_id) right for this checkpoint?")
        items = iter(spans)
        return re.sub("|".join(alternatives), lambda m: self._expand(m.group(0), next(items)), text)

    def _expand(self, placeholder: str, span: MediaSpan) -> str:
        """The tokens one rendered placeholder becomes (`MediaSpan`)."""
        token = self.image_token if span.kind == "image" else self.video_token
        if not span.timestamps:
            return placeholder.replace(token, token * span.tokens)
        return "".join(f"<{t:.1f} seconds>{self.vision_start}{token * span.tokens}{self.vision_end}"
                       for t in span.timestamps)

    def save_pretrained(self, directory: str) -> None:
        """Copy the tokenizer and template files of the source directory to `directory`."""
        import shutil

        os.makedirs(directory, exist_ok=True)
        source = os.path.dirname(self.path)
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                     "chat_template.json", "generation_config.json", "preprocessor_config.json",
                     "video_preprocessor_config.json", "processor_config.json", "vocab.json", "merges.txt"):
            if os.path.exists(os.path.join(source, name)):
                shutil.copy(os.path.join(source, name), os.path.join(directory, name))
