"""T-GM: generative pretraining on pixels, iGPT-style, with the pipeline around it."""
