"""Training: the loop (loop.py) over a typed state, the objectives, the batches, checkpoints, and the two stages."""
