"""Tiny random transformers LLaVA models as an independent numerical reference (see REFERENCE-NOTES)."""

from __future__ import annotations

import functools
import os

import numpy as np

torch = __import__("pytest").importorskip("torch")
transformers = __import__("pytest").importorskip("transformers")


def make_hf_llava(tmp_path, *, vocab=96, hidden=32, heads=4, kv_heads=4, tie=False, image_size=16, patch=4,
                  text_type="llama", attention_bias=False, feature_layer=-1, rope_theta=10000.0, seed=0,
                  vision_hidden=24, vision_heads=2):
    """Build a random `LlavaForConditionalGeneration` (noise added to every tensor, so no zeros/ones hide a
    bug), save it under tmp_path and return `(model, path)`."""
    from transformers import (LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, Qwen2Config,
                              SiglipVisionConfig)

    torch.manual_seed(seed)
    vc = SiglipVisionConfig(hidden_size=vision_hidden, intermediate_size=40, num_hidden_layers=2,
                            num_attention_heads=vision_heads, image_size=image_size, patch_size=patch)
    text_kw = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=48, num_hidden_layers=2,
                   num_attention_heads=heads, num_key_value_heads=kv_heads, tie_word_embeddings=tie,
                   rope_theta=rope_theta, max_position_embeddings=256)
    if text_type == "qwen2":
        tc = Qwen2Config(**text_kw)
    else:
        tc = LlamaConfig(attention_bias=attention_bias, **text_kw)
    n_patches = (image_size // patch) ** 2
    cfg = LlavaConfig(vision_config=vc, text_config=tc, image_token_index=5, vision_feature_select_strategy="full",
                      vision_feature_layer=feature_layer, image_seq_length=n_patches, tie_word_embeddings=tie)
    model = LlavaForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    path = str(tmp_path / "hf_llava")
    model.save_pretrained(path)
    return model, path


def hf_logits(model, pixel_values_nhwc: np.ndarray, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    """HF logits `[B, T, V]` with positions from the mask (as `generate` does for left padding)."""
    mask = torch.tensor(attention_mask, dtype=torch.long)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        out = model(input_ids=torch.tensor(input_ids, dtype=torch.long),
                    pixel_values=torch.tensor(pixel_values_nhwc).permute(0, 3, 1, 2).contiguous(),
                    attention_mask=mask, position_ids=position_ids)
    return out.logits.float().numpy()


def left_padded_batch(n_patches: int, image_token: int, vocab: int, rng: np.random.Generator, pad: int = 3,
                      text_before: int = 2, text_after: int = 5):
    """Two rows: row 0 unpadded, row 1 with `pad` left-padding tokens, each `[text][image x P][text]`."""
    length = text_before + n_patches + text_after
    ids = np.zeros((2, length + pad), np.int64)
    mask = np.zeros_like(ids)
    for row, offset in ((0, 0), (1, pad)):
        content = np.concatenate([rng.integers(6, vocab, text_before), np.full(n_patches, image_token),
                                  rng.integers(6, vocab, text_after + pad - offset)])
        ids[row, offset:] = content
        mask[row, offset:] = 1
    return ids, mask


# ----------------------------------------------------------------------------------------------------------
# Qwen2.5-VL / Qwen2-VL / Qwen3-VL

QWEN_IDS = dict(image_token_id=150, video_token_id=151, vision_start_token_id=152, vision_end_token_id=153)


def make_hf_qwen_vl(tmp_path, *, family="qwen2_5_vl", tie=False, seed=0, vocab=160, hidden=32, heads=4, kv_heads=2,
                    mrope=(1, 1, 2), ids=None):
    """A random `Qwen2_5_VLForConditionalGeneration` (or Qwen2-VL) with noise on every tensor, saved under
    tmp_path; returns `(model, path)`; `ids`: the special token ids (default `QWEN_IDS`). Qwen2.5-VL: 2 vision
    blocks, block 0 windowed (56 px windows = 2x2 merged tokens), block 1 full attention; GQA in the decoder
    (4 heads, 2 kv heads)."""
    from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLConfig,
                              Qwen2VLForConditionalGeneration)

    torch.manual_seed(seed)
    text = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=512,
                tie_word_embeddings=tie,
                rope_parameters=dict(rope_type="default", mrope_section=list(mrope), rope_theta=1e6))
    if family == "qwen2_5_vl":
        vision = dict(depth=2, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=hidden,
                      patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                      fullatt_block_indexes=[1])
        cfg, cls = Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    else:
        vision = dict(depth=2, embed_dim=32, mlp_ratio=2, num_heads=2, hidden_size=hidden, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2)
        cfg, cls = Qwen2VLConfig, Qwen2VLForConditionalGeneration
    config = cfg(vision_config=vision, text_config=text, tie_word_embeddings=tie, **(ids or QWEN_IDS))
    model = cls(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    path = str(tmp_path / f"hf_{family}_{'tied' if tie else 'untied'}")
    model.save_pretrained(path)
    return model, path


def qwen_batch(rng: np.random.Generator, sizes=((112, 84), (56, 140)), pad=(0, 3), text_before=(3, 2),
               text_after=(4, 2), vocab=150, budget_tokens=16, ids=None, low=4, patch=14, mean_std=None):
    """A left-padded batch, one image per row (sizes in px, kept: multiples of `2 * patch`): rows are
    `[pad][text][<vision_start>][image tokens][<vision_end>][text]`. Returns a dict with `input_ids`,
    `attention_mask`, `mm_token_type_ids` `[B, T]`, HF's `pixel_values` `[sum(thw), 6 patch^2]` and
    `image_grid_thw` `[B, 3]`, and rftjax's padded `patches` `[B, 4 * budget_tokens, 6 patch^2]` / `grid_thw`.
    `ids`: the special ids (default `QWEN_IDS`); text ids are drawn from `[low, vocab)`; `mean_std`: the
    processor's normalisation (default OpenAI CLIP's)."""
    special = ids or QWEN_IDS
    from PIL import Image

    from rftjax.data.qwen_image import QwenImageProcessor, pad_images

    unit = (2 * patch) ** 2
    norm = {} if mean_std is None else dict(mean=mean_std[0], std=mean_std[1])
    proc = QwenImageProcessor(patch_size=patch, min_pixels=unit, max_pixels=unit * budget_tokens, **norm)
    images = [proc(Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))) for h, w in sizes]
    rows = []
    for (patches, grid), p, before, after in zip(images, pad, text_before, text_after):
        n_img = int(np.prod(grid)) // 4
        rows.append((p, np.concatenate([rng.integers(low, vocab, before), [special["vision_start_token_id"]],
                                        np.full(n_img, special["image_token_id"]),
                                        [special["vision_end_token_id"]], rng.integers(low, vocab, after)])))
    length = max(p + len(r) for p, r in rows)
    ids = np.zeros((len(rows), length), np.int64)
    mask = np.zeros_like(ids)
    for b, (p, r) in enumerate(rows):
        ids[b, length - len(r):] = r
        mask[b, length - len(r):] = 1
    padded = pad_images(images, [budget_tokens])
    return {"input_ids": ids, "attention_mask": mask, "mm_token_type_ids": (ids == special["image_token_id"]) * 1,
            "pixel_values": np.concatenate([p for p, _ in images]), "image_grid_thw": np.stack([g for _, g in images]),
            "patches": padded["patches"], "grid_thw": padded["grid_thw"]}


QWEN3_VISION = dict(hidden_size=32, intermediate_size=64, num_heads=2, patch_size=16, temporal_patch_size=2,
                    spatial_merge_size=2, num_position_embeddings=64, hidden_act="gelu_pytorch_tanh")
"""The tiny Qwen3-VL / Qwen3.5 vision tower of the tests: patch 16, an 8 x 8 position table."""


def _save_qwen3(model_cls, config, path: str, processor: bool):
    """`model_cls(config)` with noise on every tensor, saved to `path`, with a `preprocessor_config.json` as the
    published checkpoints ship (min_pixels lowered to 32 * 32) when `processor`; returns the model."""
    import json

    model = model_cls(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(path)
    if processor:
        with open(os.path.join(path, "preprocessor_config.json"), "w") as f:
            json.dump({"image_processor_type": "Qwen2VLImageProcessorFast", "image_mean": [0.5] * 3,
                       "image_std": [0.5] * 3, "patch_size": 16, "merge_size": 2, "temporal_patch_size": 2,
                       "size": {"shortest_edge": 32 * 32, "longest_edge": 16777216}}, f)
    return model


def make_hf_qwen3_vl(tmp_path, *, tie=False, seed=0, vocab=160, hidden=32, ids=None, processor=True):
    """A random `Qwen3VLForConditionalGeneration` saved under tmp_path (`_save_qwen3`); returns `(model, path)`.
    Vision: 3 blocks, DeepStack after blocks 0 and 1; decoder: 3 layers, GQA (4 heads, 2 kv heads), head_dim 16,
    q/k norms, interleaved M-RoPE (sections 3, 3, 2: every axis has frequencies both below and past its
    interleaved range)."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    torch.manual_seed(seed)
    vision = dict(QWEN3_VISION, depth=3, out_hidden_size=hidden, deepstack_visual_indexes=[0, 1])
    text = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                rope_parameters=dict(rope_type="default", rope_theta=5e6, mrope_section=[3, 3, 2],
                                     mrope_interleaved=True))
    config = Qwen3VLConfig(vision_config=vision, text_config=text, tie_word_embeddings=tie, **(ids or QWEN_IDS))
    path = str(tmp_path / f"hf_qwen3_vl_{'tied' if tie else 'untied'}")
    return _save_qwen3(Qwen3VLForConditionalGeneration, config, path, processor), path


def make_hf_qwen3_5(tmp_path, *, tie=False, seed=0, vocab=160, hidden=32, ids=None, processor=True,
                    classifier=False):
    """A random `Qwen3_5ForConditionalGeneration` (with `classifier`: `Qwen3_5ForSequenceClassification`, one
    label, pad id 0) saved under tmp_path (`_save_qwen3`); returns `(model, path)`.
    Vision: Qwen3-VL's tower without DeepStack (2 blocks); decoder: 4 layers, Gated DeltaNet and gated attention
    alternating, GQA in both (attention: 2 heads, 1 kv head, head_dim 32; DeltaNet: 2 key heads, 4 value heads),
    partial rotary (a quarter of head_dim) with interleaved M-RoPE."""
    from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration, Qwen3_5ForSequenceClassification

    torch.manual_seed(seed)
    vision = dict(QWEN3_VISION, depth=2, out_hidden_size=hidden)
    text = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=64, num_hidden_layers=4,
                layer_types=["linear_attention", "full_attention"] * 2, num_attention_heads=2, num_key_value_heads=1,
                head_dim=32, linear_conv_kernel_dim=4, linear_key_head_dim=16, linear_value_head_dim=16,
                linear_num_key_heads=2, linear_num_value_heads=4, max_position_embeddings=512,
                rope_parameters=dict(rope_type="default", rope_theta=1e7, partial_rotary_factor=0.25,
                                     mrope_section=[2, 1, 1], mrope_interleaved=True))
    extra = dict(num_labels=1) if classifier else {}
    if classifier:
        text["pad_token_id"] = 0
    config = Qwen3_5Config(vision_config=vision, text_config=text, tie_word_embeddings=tie, **(ids or QWEN_IDS),
                           **extra)
    path = str(tmp_path / f"hf_qwen3_5_{'classifier' if classifier else 'tied' if tie else 'untied'}")
    cls = Qwen3_5ForSequenceClassification if classifier else Qwen3_5ForConditionalGeneration
    return _save_qwen3(cls, config, path, processor), path


HALF = ((0.5,) * 3, (0.5,) * 3)
"""Qwen3-VL / Qwen3.5's image mean and std."""


def loaded_by_tie(tmp_path_factory, maker):
    """`get(tie) -> (hf model, directory, config, params)`: `maker`'s checkpoint (`make_hf_qwen3_vl`,
    `make_hf_qwen3_5`), built once per tie setting, with rftjax's config and params loaded from it
    (`max_image_tokens=24`). For a module-scoped fixture."""
    cache = {}

    def get(tie: bool):
        if tie not in cache:
            model, path = maker(tmp_path_factory.mktemp("hf"), tie=tie)
            from rftjax.models import hf as rhf

            cache[tie] = (model, path, *rhf.load_pretrained(path, max_image_tokens=24))
        return cache[tie]

    return get


def hf_qwen_logits(model, batch: dict) -> np.ndarray:
    """HF logits `[B, T, V]` (M-RoPE positions from HF's own `get_rope_index`)."""
    with torch.no_grad():
        out = model(input_ids=torch.tensor(batch["input_ids"]), attention_mask=torch.tensor(batch["attention_mask"]),
                    pixel_values=torch.tensor(batch["pixel_values"]),
                    image_grid_thw=torch.tensor(batch["image_grid_thw"]),
                    mm_token_type_ids=torch.tensor(batch["mm_token_type_ids"]))
    return out.logits.float().numpy()


def hf_qwen_greedy(model, batch: dict, new_tokens: int = 16) -> np.ndarray:
    """transformers' greedy `generate` of exactly `new_tokens` tokens (image/video placeholders suppressed, no EOS)
    after the batch's prompts: the new ids `[B, new_tokens]`."""
    with torch.no_grad():
        ref = model.generate(input_ids=torch.tensor(batch["input_ids"]),
                             attention_mask=torch.tensor(batch["attention_mask"]),
                             pixel_values=torch.tensor(batch["pixel_values"]),
                             image_grid_thw=torch.tensor(batch["image_grid_thw"]),
                             mm_token_type_ids=torch.tensor(batch["mm_token_type_ids"]), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False,
                             suppress_tokens=[QWEN_IDS["image_token_id"], QWEN_IDS["video_token_id"]], pad_token_id=0,
                             eos_token_id=None)
    return ref[:, batch["input_ids"].shape[1]:].numpy()


def qwen_images(batch: dict):
    """rftjax's `QwenImages` of a `qwen_batch`."""
    import jax.numpy as jnp

    from rftjax.models import QwenImages

    return QwenImages(jnp.asarray(batch["patches"]), jnp.asarray(batch["grid_thw"]))


def qwen_logits(config, params, batch: dict) -> np.ndarray:
    """rftjax's float32 logits `[B, T, V]` of a `qwen_batch` (one jitted forward pass per config)."""
    import jax.numpy as jnp

    return np.asarray(_qwen_forward(config)(params, qwen_images(batch), jnp.asarray(batch["input_ids"], jnp.int32),
                                            jnp.asarray(batch["attention_mask"], bool)))


@functools.lru_cache(maxsize=None)
def _qwen_forward(config):
    import jax

    from rftjax.models import model_for

    return jax.jit(lambda params, images, ids, mask: model_for(config).apply({"params": params}, images, ids,
                                                                            mask).logits)


def qwen_cached_decode(config, params, batch: dict, new: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`(cached, full, valid)`: logits `[B, T + n, V]` of the prompts prefilled into a fresh decode state, then the
    `n` tokens of `new` `[B, n]` one step at a time; the same from one full forward pass; where both are defined."""
    import jax
    import jax.numpy as jnp

    from rftjax.models import model_for

    model = model_for(config)
    ids, mask = jnp.asarray(batch["input_ids"], jnp.int32), jnp.asarray(batch["attention_mask"], bool)
    new = jnp.asarray(new, jnp.int32)
    b, n = new.shape
    full = qwen_logits(config, params, {**batch, "input_ids": np.concatenate([batch["input_ids"], new], 1),
                                        "attention_mask": np.concatenate([batch["attention_mask"],
                                                                          np.ones((b, n), int)], 1)})
    step = jax.jit(lambda images, ids, mask, state: model.apply({"params": params}, images, ids, mask, state=state))
    out = step(qwen_images(batch), ids, mask, model.init_state(b, ids.shape[1] + n))
    steps = [np.asarray(out.logits)]
    for t in range(n):
        out = step(None, new[:, t:t + 1], jnp.ones((b, 1), bool), out.state)
        steps.append(np.asarray(out.logits))
    valid = np.concatenate([batch["attention_mask"], np.ones((b, n))], 1).astype(bool)
    return np.concatenate(steps, axis=1), full, valid


# ----------------------------------------------------------------------------------------------------------
# Tiny tokenizers with each family's special tokens and its published chat template

QWEN_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] "
    "== 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content "
    "%}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}")
"""Qwen2-VL-7B-Instruct's chat template (Qwen2.5-VL ships the same)."""

LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}{% for content in "
    "message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}{% endfor %}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{% generation %}"
    "{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "{{ 'ASSISTANT:' }}{% endif %}")
"""llava-hf/llava-1.5-7b-hf's chat template (with HF's `{% generation %}` markers)."""

QWEN_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                 "<|image_pad|>", "<|video_pad|>")
QWEN_TOKEN_IDS = dict(image_token_id=5, video_token_id=6, vision_start_token_id=3, vision_end_token_id=4)
LLAVA_SPECIALS = ("<unk>", "<s>", "</s>", "<pad>", "<extra>", "<image>")  # <image> = make_hf_llava's id 5


QWEN3_5_CHAT_TEMPLATE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "chat_templates",
                                     "qwen3_5.jinja")
"""Qwen3.5's published chat template (thinking by default: the generation prompt opens `<think>`)."""


def make_tokenizer_dir(path, family: str, vocab: int = 320) -> str:
    """A byte-level BPE of `vocab` tokens trained on a few sentences, with `family`'s special tokens first
    (Qwen: `<|endoftext|>` = 0 ... `<|image_pad|>` = 5; LLaVA: `<unk>` = 0, `<s>`, `</s>`, `<pad>`, `<image>` = 5)
    and its chat template, saved as `tokenizer.json` + `tokenizer_config.json` under `path`; returns `path`.
    `family="qwen3"`: Qwen's tokens with Qwen3.5's thinking template in `chat_template.jinja` (as Qwen3 checkpoints
    ship it)."""
    import json
    import shutil

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    specials = QWEN_SPECIALS if family.startswith("qwen") else LLAVA_SPECIALS
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=list(specials), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["How many red cubes are there? Reason in <think></think>, then answer.",
                             "system user assistant You are a helpful assistant. USER: ASSISTANT:"] * 20, trainer)
    os.makedirs(path, exist_ok=True)
    tok.save(os.path.join(path, "tokenizer.json"))
    if family == "qwen3":
        config = dict(eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None)
        shutil.copy(QWEN3_5_CHAT_TEMPLATE, os.path.join(path, "chat_template.jinja"))
    elif family == "qwen":
        config = dict(eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None,
                      chat_template=QWEN_CHAT_TEMPLATE)
    else:
        config = dict(eos_token="</s>", pad_token="<pad>", bos_token="<s>", unk_token="<unk>",
                      chat_template=LLAVA_CHAT_TEMPLATE)
    config.update(tokenizer_class="PreTrainedTokenizerFast", model_max_length=4096,
                  clean_up_tokenization_spaces=False)
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump(config, f)
    return str(path)
