"""Tiny image inputs for a vision-language model, as its processor would give them (no download).

One image per row: pixel values of the vision config's size and, inside the text, as many image tokens as the
vision tower and projector make of it (LLaVA: a token per patch; Mistral 3: per merged patch; Gemma 3: its
pooled `mm_tokens_per_image`; Qwen-VL: per merged patch of a (time, height, width) grid, between vision start and
end tokens). The image tokens are not learned (-100), as collators mask them.
"""

from __future__ import annotations

import torch


def vision_language(config_class) -> bool:
    """Whether models of `config_class` (or of a config instance's class) see images: it declares a vision config."""
    return "vision_config" in getattr(config_class, "sub_configs", {})


def image_inputs(config, rows: int, generator: torch.Generator) -> tuple[dict[str, torch.Tensor], int]:
    """(the model inputs of `rows` images besides the ids, image tokens per image) for `config`."""
    vision = config.vision_config
    if hasattr(vision, "temporal_patch_size"):  # Qwen-VL: flattened patches, a (t, h, w) grid per image
        merge, side = vision.spatial_merge_size, 2 * vision.spatial_merge_size
        width = vision.in_channels * vision.temporal_patch_size * vision.patch_size ** 2
        pixels = torch.randn(rows * side * side, width, generator=generator)
        grid = torch.tensor([[1, side, side]] * rows)
        return {"pixel_values": pixels, "image_grid_thw": grid}, side ** 2 // merge ** 2
    size = vision.image_size
    pixels = {"pixel_values": torch.randn(rows, vision.num_channels, size, size, generator=generator)}
    if getattr(config, "mm_tokens_per_image", None):  # Gemma 3: pooled to a fixed count
        return pixels, config.mm_tokens_per_image
    side = size // vision.patch_size
    merge = getattr(config, "spatial_merge_size", None)
    if merge:  # Mistral 3 (Pixtral): the image's size, patches merged
        return {**pixels, "image_sizes": torch.tensor([[size, size]] * rows)}, (side // merge) ** 2
    return pixels, side ** 2  # LLaVA: one token per patch (the class token dropped)


def with_images(config, batch: dict[str, torch.Tensor], *, at: int = 6, seed: int = 3) -> dict[str, torch.Tensor]:
    """`batch` (ids, mask, labels) with one image per row, its tokens from column `at` on."""
    generator = torch.Generator().manual_seed(seed)
    ids, labels = batch["input_ids"].clone(), batch["labels"].clone()
    extra, count = image_inputs(config, ids.shape[0], generator)
    start, end = getattr(config, "vision_start_token_id", None), getattr(config, "vision_end_token_id", None)
    span = slice(at, at + count)
    if ids.shape[1] < at + count + 4:
        raise ValueError(f"a row of {ids.shape[1]} tokens cannot hold an image of {count} tokens at {at}")
    if start is not None:
        ids[:, at - 1], ids[:, at + count] = start, end
    ids[:, span] = config.image_token_id
    labels[:, span] = -100
    out = {**batch, "input_ids": ids, "labels": labels, **extra}
    image = (ids == config.image_token_id).long()
    if start is not None:  # Qwen-VL: which tokens are an image's, for its 3-D positions
        out["mm_token_type_ids"] = image
    if getattr(config, "mm_tokens_per_image", None):  # Gemma 3: image tokens attend to each other both ways
        out["token_type_ids"] = image
    return out
