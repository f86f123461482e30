"""T-GM: generative pretraining on pixels, iGPT-style, with the pipeline around it."""

__version__ = "0.1.0"
