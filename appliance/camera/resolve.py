"""`open_source`: which frame source the text of `camera.source` names.

Each source module offers resolvers: functions `(source, cfg, opener) -> FrameSource | None` that return
None for text that is not theirs, a source for text that is, and raise CameraError for text that is theirs
but unusable (a folder without images, "synthetic:many", a pipeline without an appsink). `open_source`
asks them in the order of `RESOLVERS`; the first that does not return None decides.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from appliance.camera import files, live, none, synthetic, video
from appliance.camera.base import FrameSource, Opener, mask_credentials
from appliance.settings import CameraSection
from bundle.errors import CameraError

Resolver = Callable[[str, CameraSection, Opener | None], FrameSource | None]

# Tried first to last. Several texts would be claimed by more than one resolver, so the order is the rule:
RESOLVERS: tuple[Resolver, ...] = (
    # "none" (no camera: parts only from uploads) first: a keyword, like "synthetic", whatever happens to be on
    # disk under that name (a folder called "none" in the working directory must not become the camera).
    none.resolve_none,
    # "synthetic" / "synthetic:N" first: it is a keyword, whatever happens to be on disk under that name.
    synthetic.resolve_synthetic,
    # A digit string is a device index before any path check: a stray file named "0" in the working
    # directory must not win.
    live.resolve_device_index,
    # Existing paths before the pattern-like rules below: a folder or file name may contain "!" (pipeline)
    # or "[", "*", "?" (glob).
    files.resolve_folder,
    # An existing file: an image suffix makes it one image part; any other file must be a video (the
    # video resolver claims every file, so it comes after the image one).
    files.resolve_image_file,
    video.resolve_video_file,
    # A GStreamer pipeline before the URL check: any text with "!" is a pipeline, even one that starts
    # like a URL (a pipeline often holds one: rtspsrc location=rtsp://...).
    live.resolve_pipeline,
    # URLs before the glob: a query string may hold a "?" (http://cam/mjpg?fps=5).
    live.resolve_url,
    # /dev/videoN: a character device, which no path rule above claims; it need not exist yet.
    live.resolve_device_path,
    # Last: a glob claims any text with *, ? or [ in it.
    files.resolve_glob,
)
# Nothing claimed the text: an existing path that is neither file nor folder (a socket, /dev/null), or an
# unknown source; both are CameraErrors raised by open_source after the loop.

_EXPECTED = (
    'expected "none" (uploads only), "synthetic" or "synthetic:N", a device index ("0") or /dev/videoN, '
    "an existing video file, an image folder or glob pattern, an rtsp:// or http(s):// URL, "
    "or a GStreamer pipeline ending in appsink"
)


def open_source(cfg: CameraSection, opener: Opener | None = None) -> FrameSource:
    """Open the source named by `cfg.source`; CameraError names the source and what was expected.

    `opener` replaces the capture of a live source (device, URL, pipeline): a test seam for a camera that
    disappears and returns. Live sources do not fail here when the camera is absent: they keep retrying and
    report `connected=False` in `state()`.
    """
    source = cfg.source.strip()
    if not source:
        raise CameraError(f"camera.source is empty; {_EXPECTED}")
    for resolve in RESOLVERS:
        opened = resolve(source, cfg, opener)
        if opened is not None:
            return opened
    shown = mask_credentials(source)
    if Path(source).exists():
        raise CameraError(f"camera.source {shown!r} is neither a file nor a folder; {_EXPECTED}")
    raise CameraError(f"camera.source {shown!r} does not exist and is not a known source; {_EXPECTED}")
