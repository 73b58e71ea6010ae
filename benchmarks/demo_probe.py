"""What the demo's CLIP stand-in tells the LLM about each object: linear probes on its patch tokens.

For every box of the world's instances files, an object's feature is taken at the layer LLaVA reads
(`--layer`, default the penultimate) two ways: the patch token under the box's centre, and the mean of
the tokens of the patches the box covers (what the LLM gets if it attends to the object's patches
evenly). A linear classifier trained on the train split's objects predicts the object's shape and,
separately, its colour on the test split's objects. Every demo question type but colour needs shape
(chance is 1/3 for shape, 1/5 for colour).

    python benchmarks/demo_probe.py --clip runs/demo/parts/clip --world runs/demo/world
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from transformers import CLIPVisionModel

from vistune.demo.standins import box_regions as _regions, load_pixels as _pixels


def object_tokens(clip: Path, world: Path, split: str, limit: int,
                  layer: int) -> tuple[torch.Tensor, list[list[tuple[list[int], str]]], int]:
    """The patch tokens at `layer` of the first `limit` images of `split` ([N_images, grid*grid, D]),
    their boxes as `_regions` gives them, and the grid side."""
    instances = world / "annotations" / f"instances_{split}.json"
    images = json.loads(instances.read_text())["images"][:limit]
    model = CLIPVisionModel.from_pretrained(clip).eval()
    size, patch = model.config.image_size, model.config.patch_size
    with torch.no_grad():
        tokens = model(pixel_values=_pixels(world / split, [im["file_name"] for im in images], size),
                       output_hidden_states=True).hidden_states[layer][:, 1:]
    return tokens, _regions(instances, images, size, patch), size // patch


def pool_objects(tokens: torch.Tensor, regions: list[list[tuple[list[int], str]]], grid: int,
                 pool: str = "centre") -> tuple[torch.Tensor, list[str], list[str]]:
    """One feature per object, `pool` "centre" (the token of the patch under the box's centre) or
    "box" (the mean over the patches the box covers): ([N, D], shapes, colours)."""
    feats, shapes, colours = [], [], []
    for k, boxes in enumerate(regions):
        for patches, caption in boxes:  # caption: "A red circle."
            if pool == "box":
                feats.append(tokens[k, patches].mean(0))
            else:
                rows, cols = [p // grid for p in patches], [p % grid for p in patches]
                centre = (min(rows) + max(rows)) // 2 * grid + (min(cols) + max(cols)) // 2
                feats.append(tokens[k, centre])
            colour, shape = caption.rstrip(".").split()[-2:]
            colours.append(colour)
            shapes.append(shape)
    return torch.stack(feats), shapes, colours


def object_features(clip: Path, world: Path, split: str, limit: int, layer: int,
                    pool: str = "centre") -> tuple[torch.Tensor, list[str], list[str]]:
    """`pool_objects` of `object_tokens`: one feature per object in the first `limit` images."""
    return pool_objects(*object_tokens(clip, world, split, limit, layer), pool)


def probe(x_train: torch.Tensor, y_train: list[str], x_test: torch.Tensor, y_test: list[str], seed: int = 0) -> float:
    """Test accuracy of a linear classifier (standardised features, Adam, 300 full-batch steps)."""
    torch.manual_seed(seed)
    labels = {label: i for i, label in enumerate(sorted(set(y_train)))}
    mean, std = x_train.mean(0), x_train.std(0) + 1e-5
    linear = torch.nn.Linear(x_train.shape[1], len(labels))
    opt = torch.optim.Adam(linear.parameters(), lr=1e-2, weight_decay=1e-4)
    target = torch.tensor([labels[y] for y in y_train])
    for _ in range(300):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(linear((x_train - mean) / std), target).backward()
        opt.step()
    with torch.no_grad():
        predicted = linear((x_test - mean) / std).argmax(-1)
    return (predicted == torch.tensor([labels.get(y, -1) for y in y_test])).float().mean().item()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clip", type=Path, default=Path("runs/demo/parts/clip"))
    p.add_argument("--world", type=Path, default=Path("runs/demo/world"))
    p.add_argument("--layer", type=int, default=-2)
    p.add_argument("--train-images", type=int, default=2000)
    p.add_argument("--test-images", type=int, default=400)
    args = p.parse_args()
    result: dict = {"clip": str(args.clip), "layer": args.layer}
    train = object_tokens(args.clip, args.world, "train", args.train_images, args.layer)  # the tower runs once
    test = object_tokens(args.clip, args.world, "test", args.test_images, args.layer)  # per split
    for pool in ("centre", "box"):
        x_tr, s_tr, c_tr = pool_objects(*train, pool)
        x_te, s_te, c_te = pool_objects(*test, pool)
        result.update({"train_objects": len(s_tr), "test_objects": len(s_te),
                       f"shape_{pool}": round(probe(x_tr, s_tr, x_te, s_te), 3),
                       f"colour_{pool}": round(probe(x_tr, c_tr, x_te, c_te), 3)})
    print(json.dumps(result))


if __name__ == "__main__":
    main()
