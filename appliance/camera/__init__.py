"""Frame sources: where the station's frames come from (files, folders, video, V4L2/USB, RTSP/HTTP,
GStreamer, synthetic parts). `open_source(camera_section)` picks one from `camera.source`; every source
has the same small interface (`read`, `state`, `close`, `live`, `exhausted`)."""

from appliance.camera.sources import CameraState, Frame, FrameSource, open_source

__all__ = ["CameraState", "Frame", "FrameSource", "open_source"]
