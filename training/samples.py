"""Write the sample frames of the demo: synthetic micro-CT-like slices in each pixel type.

    python -m training.samples --out samples
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import numpy as np
import tifffile
from PIL import Image

from training.synthetic import synthetic_slice, to_detector_counts

# name, (height, width), pixel type, noise: odd sizes on purpose.
SAMPLES = (
    ("slice_2048x2048_uint16.tif", (2048, 2048), np.uint16, 0.08),
    ("slice_1001x777_float32.npy", (777, 1001), np.float32, 0.06),
    ("slice_640x480_uint8.png", (480, 640), np.uint8, 0.10),
)


def write_samples(directory: pathlib.Path, seed: int = 7) -> list[pathlib.Path]:
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    written = []
    for name, shape, dtype, noise in SAMPLES:
        image, labels = synthetic_slice(shape, rng, noise=noise)
        path = directory / name
        if dtype == np.float32:
            np.save(path, image)
        elif path.suffix == ".png":
            Image.fromarray(to_detector_counts(image, dtype, rng)).save(path)
        else:
            tifffile.imwrite(path, to_detector_counts(image, dtype, rng))
        tifffile.imwrite(directory / f"{path.stem}_truth.tif", labels, compression="zlib")
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("samples"), help="default: %(default)s")
    args = parser.parse_args(argv)
    for path in write_samples(args.out):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
