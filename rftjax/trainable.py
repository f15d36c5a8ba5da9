"""Which params a run trains: the partition of a param tree into trainable and frozen leaves.

    trainable, frozen = split(params, model_config, freeze)   # disjoint nested dicts
    params = combine(trainable, frozen)                        # the full tree again, inside jit or out

Rules: with LoRA (`model_config.lora`) only the adapter matrices train (the base weights are frozen: their
gradient, optimizer state and reference copy are never allocated); otherwise every param trains. On top of that,
params whose path matches the `freeze` regex (`re.fullmatch` on `/`-joined paths such as
`vision_tower/layers_0/q_proj/kernel`) are frozen: `vision_tower/.*` freezes LLaVA's vision tower,
`visual/.*` Qwen-VL's, `(vision_tower|multi_modal_projector)/.*` the tower and the projector (big_vision's
regex freezing). The train state holds the trainable tree only; the frozen one stays on the devices, outside it,
and is passed to every jitted function next to it.
"""

from __future__ import annotations

import re

from flax import traverse_util

from rftjax.models import lora as lora_lib


def _paths(params: dict) -> dict[tuple[str, ...], object]:
    return traverse_util.flatten_dict(params)


def flat_paths(tree: dict) -> list[tuple[str, ...]]:
    """The key paths of the leaves of a nested dict (params, their shardings or shapes)."""
    return list(_paths(tree))


def trainable_paths(params: dict, model_config, freeze: str = "") -> set[tuple[str, ...]]:
    """The key paths of the params that train (see the module docstring).

    Raises:
      ValueError: `freeze` is not a regex, matches no param, or leaves nothing to train.
    """
    paths = flat_paths(params)
    adapters = model_config.lora is not None
    train = {p for p in paths if lora_lib.is_adapter(p) or not adapters}
    if freeze:
        try:
            pattern = re.compile(freeze)
        except re.error as e:
            raise ValueError(f"bad config: optim.freeze={freeze!r} is not a regex ({e})") from None
        frozen = {p for p in paths if pattern.fullmatch("/".join(p))}
        if not frozen:
            example = "/".join(paths[0])
            raise ValueError(f"bad config: optim.freeze={freeze!r} matches no param (paths look like {example!r}; "
                             f"the regex must match a whole path, e.g. 'vision_tower/.*')")
        train -= frozen
    if not train:
        raise ValueError(f"bad config: nothing left to train (optim.freeze={freeze!r}"
                         f"{', LoRA: only adapters train' if adapters else ''})")
    return train


def split(params: dict, paths: set[tuple[str, ...]]) -> tuple[dict, dict]:
    """`(trainable, frozen)`: the leaves of `params` at `paths` and the rest, as two nested dicts (either may be
    `{}`)."""
    flat = _paths(params)
    if len(paths) == len(flat):
        return params, {}
    unflat = traverse_util.unflatten_dict
    return (unflat({k: v for k, v in flat.items() if k in paths}),
            unflat({k: v for k, v in flat.items() if k not in paths}))


def combine(trainable: dict, frozen: dict) -> dict:
    """The full param tree of a `split` (`frozen` `{}`: `trainable` itself)."""
    if not frozen:
        return trainable
    return traverse_util.unflatten_dict({**_paths(frozen), **_paths(trainable)})
