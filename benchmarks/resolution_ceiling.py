"""What Fashion-MNIST's pixels allow at T-GM's 14x14 and 16 grey levels, against the full 28x28 images.

Issue 27 asks for 0.90 test accuracy with all labels, the dataset paper's RBF SVC at 28x28. T-GM sees the images
shrunk to 14x14 and quantised to 16 grey levels. This measures what that costs a pixel classifier that needs no
pretraining: the same RBF SVM (C=10, gamma='scale': the dataset paper's best SVC setting, fixed beforehand, so
nothing is chosen on the test split) on N labelled training images seen three ways: 28x28, 14x14 (T-GM's
resize) and 14x14 quantised to the project's palette (the tokens T-GM reads), scored on the 10,000 test images.
The gap between the first and the last, at the same N, is what the input alone takes away.

    python benchmarks/resolution_ceiling.py --project DIR [--sizes 5000 20000]

`DIR` is a project whose data/prepared holds the profile's palette (the Fashion-MNIST profile's, after
`dvc repro prepare`). An RBF SVM on all 60,000 images is hours on 2 cores, hence the sizes.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.svm import SVC

from tgm.ingest import fashion_mnist
from tgm.preprocess import PreprocessSpec, image_pixels, pixel_features, quantize_to_palette
from tgm.study import label_subset


def views(images: np.ndarray, spec: PreprocessSpec) -> dict[str, np.ndarray]:
    """The images as three flat feature sets in [0, 1]: full size, T-GM's resize, and T-GM's tokens."""
    size = spec.image_size
    small = np.stack([image_pixels(Image.fromarray(im), size, spec.color_mode) for im in images])  # (N, S*S, 1)
    tokens = quantize_to_palette(small.reshape(-1, small.shape[-1]), spec.palette).reshape(len(images), -1)
    return {
        f"{images.shape[1]}x{images.shape[2]}": images.reshape(len(images), -1) / 255.0,
        f"{size}x{size}": small.reshape(len(images), -1) / 255.0,
        f"{size}x{size}, {spec.palette_size} levels": pixel_features(tokens, spec),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--project", type=Path, required=True)
    ap.add_argument("--sizes", type=int, nargs="+", default=[5000, 20000], help="labelled training images")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    spec = PreprocessSpec.load(args.project / "data/prepared")
    data = fashion_mnist()
    (train_x, train_y), (test_x, test_y) = data["train"], data["test"]
    test = views(test_x, spec)
    rows = []
    for n in args.sizes:
        idx = label_subset(train_y, None, args.seed, min_per_class=1, per_class=n // 10)
        train = views(train_x[idx], spec)
        row = {"n": len(idx)}
        for name, x in train.items():
            t0 = time.perf_counter()
            svm = SVC(C=10.0, gamma="scale").fit(x, train_y[idx])
            row[name] = float((svm.predict(test[name]) == test_y).mean())
            print(f"{len(idx)} images, {name}: test {row[name]:.4f} ({time.perf_counter() - t0:.0f}s)", flush=True)
        rows.append(row)
    names = list(test)
    print(f"\nRBF SVM (C=10, gamma='scale'), test accuracy on {len(test_y)} images; the last column: what "
          f"{names[-1]} costs against {names[0]}")  # fmt: skip
    print("| labelled images | " + " | ".join(names) + " | gap |")
    print("|---|" + "---|" * (len(names) + 1))
    for row in rows:
        cells = [f"{row[n]:.4f}" for n in names] + [f"{(row[names[-1]] - row[names[0]]) * 100:+.1f} points"]
        print(f"| {row['n']} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
