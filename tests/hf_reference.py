"""Tiny random transformers LLaVA models as an independent numerical reference (see REFERENCE-NOTES)."""

from __future__ import annotations

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
