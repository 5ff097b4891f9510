"""Frame sources: where the station's frames come from (files, folders, video, V4L2/USB, RTSP/HTTP,
GStreamer, synthetic parts, or none: uploads only). `open_source(camera_section)` picks one from `camera.source`;
every source has the same small interface (`read`, `state`, `close`, `live`, `exhausted`), defined by `FrameSource`.

Modules:

- `base`: `Frame`, `CameraState`, the `FrameSource` base class and `OnDemandSource` (decoded in the
  caller's pace, never drops), `mask_credentials`, the frame checks every source shares.
- `files`: image files, an image folder or a glob pattern (`ImageFilesSource`).
- `video`: a recorded video file (`VideoFileSource`).
- `synthetic`: rendered synthetic parts (`SyntheticSource`; loads `synthetic.parts` only when used).
- `none`: no camera (`NoCameraSource`): a station that only inspects uploads (`Pipeline.submit`).
- `live`: live cameras on their own clock, newest frame only, reconnecting (`LiveSource`), and the openers
  for a V4L2/USB device, an rtsp/http(s) URL and a GStreamer pipeline.
- `resolve`: `open_source` and `RESOLVERS`, the ordered list that decides which module a `camera.source`
  text belongs to.

Adding a source: one module with a `FrameSource` subclass (usually of `OnDemandSource`, or a `LiveSource`
with a new opener) and a resolver `(source, cfg, opener) -> FrameSource | None` that returns None for text
that is not its own; then one entry in `resolve.RESOLVERS`, at the position its comment there justifies.
Other packages import only the four names below.
"""

from appliance.camera.base import CameraState, Frame, FrameSource
from appliance.camera.resolve import open_source

__all__ = ["CameraState", "Frame", "FrameSource", "open_source"]
