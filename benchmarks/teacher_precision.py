"""How far a bfloat16 teacher's distillation target lies from the float32 teacher's, on one batch.

    python benchmarks/teacher_precision.py

For the shipped world CLIP (on 256 test_id images of the embedded world) and a randomly initialised ViT-B/16 image
tower (16 random 224 px images), it computes the teacher's image embeddings (the FT+FD / CFFT target) in float32 and
with the weights and inputs cast to bfloat16 (`--teacher_dtype bfloat16`), and prints the max and mean absolute
difference, relative to the mean absolute value of the float32 embeddings, and the cosine similarity.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def compare(model: torch.nn.Module, pixels: torch.Tensor) -> dict[str, float]:
    with torch.inference_mode():
        exact = model.get_image_features(pixels)
        light = copy.deepcopy(model).to(torch.bfloat16).get_image_features(pixels.to(torch.bfloat16)).float()
    diff = (light - exact).abs()
    scale = exact.abs().mean()
    return {
        "max_abs": diff.max().item(),
        "mean_abs": diff.mean().item(),
        "max_rel": (diff.max() / scale).item(),
        "mean_rel": (diff.mean() / scale).item(),
        "cosine_min": torch.nn.functional.cosine_similarity(light, exact).min().item(),
    }


def main() -> None:
    from _harness import SIZES, build_model

    from hf_cfft import load_classifier
    from hf_cfft.world import WORLD_CLASS_NAMES, WORLD_TEMPLATES, images_to_pixel_values, render_world, world_clip_path

    torch.set_num_threads(1)
    world = load_classifier(str(world_clip_path()), class_names=list(WORLD_CLASS_NAMES),
                            templates=list(WORLD_TEMPLATES), show_progress=False).eval()  # fmt: skip
    pixels = images_to_pixel_values(render_world("test_id", size=256).images)
    rows = {"world CLIP, 256 test_id images": compare(world, pixels)}
    vit = build_model(SIZES["vit-b16"]).eval()
    rows["ViT-B/16 (random weights), 16 images"] = compare(
        vit, torch.randn(16, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    )
    print("| teacher | max abs diff | mean abs diff | max / mean abs value | mean / mean abs value | min cosine |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, r in rows.items():
        print(
            f"| {name} | {r['max_abs']:.4f} | {r['mean_abs']:.4f} | {r['max_rel']:.3f} | {r['mean_rel']:.4f} "
            f"| {r['cosine_min']:.5f} |"
        )


if __name__ == "__main__":
    main()
