"""What a served classifier must answer for an image, computed without any of tgm's preprocessing, inference or
typicality helpers: the image decoded and resized with Pillow, the palette's nearest colour found with integer
arithmetic, the model's forward pass read directly. The service tests compare the server with this."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


class Reference:
    def __init__(self, model_dir: str | Path, typicality: str | Path | None = None):
        from safetensors.torch import load_file

        from tgm.model import TGM, TGMConfig  # the model itself is what is served: only it is shared

        model_dir = Path(model_dir)
        config = json.loads((model_dir / "config.json").read_text())
        spec = json.loads((model_dir / "preprocess.json").read_text())
        self.size, self.mode = spec["image_size"], "L" if spec["color_mode"] == "grey" else "RGB"
        self.palette = np.load(model_dir / "palette.npy").astype(np.int64)  # (K, C)
        self.classes = config["classes"]
        self.model = TGM(TGMConfig(**config["model"]))
        self.model.load_state_dict(load_file(str(model_dir / "model.safetensors")))
        self.model.eval()
        self.threshold = json.loads(Path(typicality).read_text())["threshold"] if typicality else None

    def tokens(self, path: str | Path) -> np.ndarray:
        with Image.open(path) as im:
            im = im.convert(self.mode)
            if im.size != (self.size, self.size):
                shrink = im.width >= self.size and im.height >= self.size
                im = im.resize((self.size, self.size), Image.Resampling.BOX if shrink else Image.Resampling.BILINEAR)
            pixels = np.asarray(im, dtype=np.int64).reshape(self.size * self.size, -1)
        distance = ((pixels[:, None, :] - self.palette[None, :, :]) ** 2).sum(-1)  # exact: ties go to the first
        return distance.argmin(1)

    def answer(self, path: str | Path) -> dict:
        tokens = torch.from_numpy(self.tokens(path))[None]
        with torch.no_grad():
            logits, class_logits = self.model(tokens)
        probs = torch.softmax(class_logits.float(), -1)[0].numpy()
        bpp = float(F.cross_entropy(logits[0].float(), tokens[0])) / math.log(2)
        return {
            "label": self.classes[int(probs.argmax())],
            "probabilities": dict(zip(self.classes, probs.tolist())),
            "bits_per_pixel": bpp,
            "typical": None if self.threshold is None else bpp <= self.threshold,
        }
