"""The BentoML service: one class, the model loaded once, each API a typed method.

`bentoml serve` in the project root serves the newest `tgm-classifier` in the local model store; a built
Bento pins the exact model version it was built with (TGM_MODEL is set by `tgm package` at build time).
"""
from __future__ import annotations

import os
from pathlib import Path

import bentoml
from bentoml.exceptions import InvalidArgument

from tgm.images import InvalidImage, open_image
from tgm.inference import Classifier

MODEL = os.environ.get("TGM_MODEL", "tgm-classifier:latest")


@bentoml.service(traffic={"timeout": 60})
class TGMClassifier:
    bento_model = bentoml.models.BentoModel(MODEL)

    def __init__(self) -> None:
        self.classifier = Classifier(self.bento_model.path)

    @bentoml.api
    def classify(self, image: Path) -> dict:
        """Classify one image file (multipart field `image`): the label and each class's probability."""
        # The upload arrives as a file and is decoded here, so a bad file is a 400 naming the problem.
        try:
            img = open_image(image)
        except InvalidImage as exc:
            raise InvalidArgument(f"image: {exc}") from None
        return self.classifier.classify([img])[0]
