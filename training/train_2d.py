"""Train the default 2D network on synthetic slices and save a small checkpoint.

    python -m training.train_2d --out training/checkpoints/unet2d_particles

writes ``<out>.pt`` (state dict) and ``<out>.json`` (architecture, arguments, tile, classes):
the pair that ``python -m export`` takes. Seeds are fixed, so a rerun on the same library
versions reproduces the checkpoint up to floating-point nondeterminism of the CPU kernels.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import numpy as np
import torch
from monai.losses import DiceCELoss
from monai.networks.nets import UNet

from segserve.options import PipelineOptions
from segserve.preprocess import normalize
from training.synthetic import CLASS_NAMES, synthetic_slice

ARCHITECTURE_ARGS = {
    "spatial_dims": 2,
    "in_channels": 1,
    "out_channels": len(CLASS_NAMES),
    "channels": [16, 32, 64, 128],
    "strides": [2, 2, 2],
    "num_res_units": 2,
}
TILE = (128, 128)


def training_batch(batch_size: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Tiles cropped from larger slices normalised as the server does (whole-slice percentiles).

    Returns:
        images ``[B, 1, *TILE]`` float32, labels ``[B, 1, *TILE]`` int64.
    """
    images, labels = [], []
    for _ in range(batch_size):
        image, label = synthetic_slice((256, 256), rng, noise=rng.uniform(0.03, 0.12))
        image = image * rng.uniform(0.5, 2.0) + rng.uniform(-0.3, 0.3)  # detector gain and offset
        normalized = normalize(torch.from_numpy(image)[None], PipelineOptions())
        y, x = rng.integers(0, 256 - TILE[0] + 1), rng.integers(0, 256 - TILE[1] + 1)
        images.append(normalized[:, y : y + TILE[0], x : x + TILE[1]])
        labels.append(torch.from_numpy(label[None, y : y + TILE[0], x : x + TILE[1]].astype(np.int64)))
    return torch.stack(images), torch.stack(labels)


def train(network: torch.nn.Module, next_batch, steps: int, learning_rate: float = 3e-3) -> torch.nn.Module:
    """Adam + cosine schedule on DiceCE loss; ``next_batch()`` returns (images, int64 labels)."""
    loss_function = DiceCELoss(to_onehot_y=True, softmax=True)
    optimizer = torch.optim.Adam(network.parameters(), lr=learning_rate)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    start = time.monotonic()
    for step in range(1, steps + 1):
        images, labels = next_batch()
        optimizer.zero_grad()
        loss = loss_function(network(images), labels)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if step % 25 == 0 or step == steps:
            print(f"step {step}/{steps} loss {loss.item():.4f} ({time.monotonic() - start:.0f} s)", flush=True)
    return network.eval()


def save_checkpoint(out: pathlib.Path, network: torch.nn.Module, metadata: dict) -> None:
    """``<out>.pt`` (state dict) and ``<out>.json`` (what ``python -m export --spec`` reads)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(network.state_dict(), out.with_suffix(".pt"))
    out.with_suffix(".json").write_text(json.dumps(metadata, indent=2) + "\n")
    print(f"wrote {out.with_suffix('.pt')} and {out.with_suffix('.json')}")


@torch.no_grad()
def evaluate(network: torch.nn.Module, seed: int) -> dict[str, float]:
    """Per-class Dice on fresh synthetic 512x512 slices, predicted whole (fully convolutional)."""
    rng = np.random.default_rng(seed + 1000)

    def predictions():
        for _ in range(4):
            image, label = synthetic_slice((512, 512), rng, noise=0.08)
            yield network(normalize(torch.from_numpy(image)[None], PipelineOptions())[None]).argmax(1)[0].numpy(), label

    return dice_scores(predictions(), CLASS_NAMES)


def dice_scores(predictions_and_labels, class_names: tuple[str, ...]) -> dict[str, float]:
    """Mean per-class Dice over ``(prediction, label)`` class-index arrays."""
    scores = {name: [] for name in class_names}
    for prediction, label in predictions_and_labels:
        for index, name in enumerate(class_names):
            truth, predicted = label == index, prediction == index
            scores[name].append(2 * (truth & predicted).sum() / max(truth.sum() + predicted.sum(), 1))
    return {name: float(np.mean(values)) for name, values in scores.items()}


def train_and_save(argv: list[str] | None, *, description: str, out: str, steps: int, batch_size: int,
                   arguments: dict, tile: tuple[int, ...], classes: tuple[str, ...], training_batch, evaluate) -> int:
    """The command line of a training script: a MONAI ``UNet(**arguments)`` trained on
    ``training_batch(batch_size, rng)``, scored by ``evaluate(network, seed)`` and saved."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path(out),
                        help="checkpoint path without suffix (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=steps, help="optimizer steps (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=batch_size, help="tiles per step (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    network = train(UNet(**arguments), lambda: training_batch(args.batch_size, rng), args.steps)
    dice = evaluate(network, args.seed)
    print("dice on held-out data:", ", ".join(f"{name} {value:.3f}" for name, value in dice.items()))
    save_checkpoint(args.out, network, {"architecture": "UNet", "arguments": arguments, "tile": list(tile),
                                        "classes": list(classes), "dice": dice, "steps": args.steps, "seed": args.seed})
    return 0


def main(argv: list[str] | None = None) -> int:
    return train_and_save(argv, description=__doc__, out="training/checkpoints/unet2d_particles", steps=400,
                          batch_size=16, arguments=ARCHITECTURE_ARGS, tile=TILE, classes=CLASS_NAMES,
                          training_batch=training_batch, evaluate=evaluate)


if __name__ == "__main__":
    sys.exit(main())
