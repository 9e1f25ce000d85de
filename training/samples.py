"""Write the sample data: the demo's synthetic micro-CT-like frames in each pixel type, and
for the README's other commands a TIFF stack, a CT volume (NIfTI) and the stack as zarr.

    python -m training.samples --out samples      # = make samples
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import numpy as np
import tifffile
from PIL import Image

from training.synthetic import synthetic_slice, to_detector_counts
from training.synthetic_3d import synthetic_volume, to_int16_hu

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


STACK_NAME = "stack_8x512x512_uint16"  # .tif and .zarr
VOLUME_NAME = "ct_80x160x160_int16.nii.gz"


def write_stack_and_volume_samples(directory: pathlib.Path, seed: int = 8) -> list[pathlib.Path]:
    """A stack ``[8, 512, 512]`` uint16 as a TIFF stack and as a zarr array (one chunk per
    frame), and a CT-like volume ``[80, 160, 160]`` int16 (Hounsfield units) as NIfTI."""
    import nibabel
    import zarr

    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    stack = np.stack([to_detector_counts(synthetic_slice((512, 512), rng)[0], np.uint16, rng) for _ in range(8)])
    tifffile.imwrite(directory / f"{STACK_NAME}.tif", stack)
    store = directory / f"{STACK_NAME}.zarr"
    zarr.create_array(store, shape=stack.shape, chunks=(1, 512, 512), dtype=stack.dtype, overwrite=True)[:] = stack
    volume = to_int16_hu(synthetic_volume((80, 160, 160), rng)[0])
    nibabel.save(nibabel.Nifti1Image(volume, np.diag([0.8, 0.8, 2.0, 1.0])), directory / VOLUME_NAME)
    return [directory / f"{STACK_NAME}.tif", store, directory / VOLUME_NAME]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("samples"), help="default: %(default)s")
    args = parser.parse_args(argv)
    for path in write_samples(args.out) + write_stack_and_volume_samples(args.out):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
