"""Developer tools that sit beside the pipeline: the CPU benchmark (`make bench`), data packing, GPU sessions.

Not part of the installed package: run them from the repository root (`python -m tools.bench`).
"""
