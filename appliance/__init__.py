"""The station: camera -> preprocess -> inference -> decision -> sinks (results log, MQTT, ...).

Subpackages, lowest first (docs/architecture.md): `inference/` (backends, registry, GPU-loss supervisor),
`settings.py`, `camera/` (frame sources), `station/` (pipeline, status, modes, the sink protocol),
`reporting/` (sinks, fan-out, MQTT, heartbeat, commands), then `runtime.py`, `doctor.py`, `cli.py`.
Imports here stay free of torch: this package is what runs on the Jetson.
"""

__version__ = "0.1.0"
