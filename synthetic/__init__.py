"""Synthetic machined parts: one deterministic renderer shared by training datasets (`training.synthetic`),
the station's `synthetic` camera source and the benchmark's frames. Needs only OpenCV and numpy: no torch,
and it imports nothing of the pipeline, so every step can use it."""
