"""The model bundle contract, below every step: the bundle's format and verification (`format`), the one
preprocessing function (`preprocess`), the operating point and decision rule (`decision`), image decoding
and bit depth (`images`), the shared errors with their exit codes (`errors`), and the ONNX Runtime session
(`onnx_runtime`). training, export, engines and the station all import it; it imports none of them.
No torch here: the station loads it on the Jetson."""
