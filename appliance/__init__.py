"""Station runtime: camera -> preprocess -> inference -> decision -> report.

Imports here stay free of torch: this package is what runs on the Jetson.
"""

__version__ = "0.1.0"
