"""Video files in and out: RGB frames one at a time, written back as H.264 with the source audio.

Reading
    Any file ffmpeg can decode is accepted. Frames come out as RGB ``uint8`` arrays of shape
    ``(H, W, 3)``, one at a time, so a long video never sits in memory.

    *Every frame, with its own time.* Each decoded frame comes out once, in presentation order,
    and :class:`FrameTimes` records when it is shown: the stream's own timestamps in its own time
    base. Phone videos are often variable frame rate (VFR); resampling them to a constant rate
    would drop some frames and repeat others, and an edit would then lose pictures and drift from
    the audio. Editing and temporal smoothing work on the frame sequence; the output is written
    with the input's timestamps (``write_video(..., times=info.times)``), so it plays exactly like
    the input. ``fps`` is the stream's average rate (for display, and the encoder's nominal rate).
    The timestamps are read from the packets when probing (demuxing only, no decoding).

    *Rotation.* Phones store the picture sideways and record how to turn it in a display matrix.
    Frames are rotated upright (multiples of 90 degrees; mirror flags are ignored) and
    width/height are the upright ones. Non-square pixels (sample aspect ratio) are not resampled.

Writing
    H.264 (libx264, ``crf``) in yuv420p, in an .mp4 container whatever the target's suffix.
    Frames are spaced ``1 / fps`` apart, or carry the given :class:`FrameTimes`.

    *Colours.* With a source video (``colour_from``, else ``audio_from`` when it has a video
    stream) the output carries the source's colour tags, and RGB frames are converted to YUV with
    the matrix the reader decodes that source with -- for untagged sources, as swscale does, BT.601
    limited range, and the output stays untagged -- so edited frames read back as they were
    written. Without a source, colours are converted and tagged as BT.709 limited range.

    *Pass-through.* Besides RGB arrays, ``frames`` may hold :class:`SourceFrame` s from
    :func:`iter_source_frames`: the input's own decoded yuv420p picture, encoded as is with no RGB
    round trip (which alone costs ~44 dB from chroma re-subsampling and rounding), so unedited
    frames come back as the input read back, re-encoding aside (>= 45 dB PSNR at the default crf).
    A source frame whose colour tags differ from the output's goes through RGB instead.

    Also in writing: yuv420p stores colour at half resolution, so odd
    widths/heights are padded to the next even number by repeating the last row/column: a 65x49
    input comes back as 66x50. The file is written under a temporary name next to the target and
    renamed onto it only when complete, so a crash never leaves a half-written video behind; the
    temporary files a killed earlier write of the same target left are removed when one succeeds.
    The audio of ``audio_from`` is copied as is when mp4 can carry its codec, else re-encoded to
    AAC, and cut so that it ends with the video (to within half an audio packet, well under a
    frame). Audio shorter than the video is not padded.
"""

from __future__ import annotations

import bisect
import math
import os
import re
import secrets
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from fractions import Fraction
from itertools import chain
from pathlib import Path
from typing import TypeVar

import av
import numpy as np
from av.audio.stream import AudioStream
from av.container import InputContainer, OutputContainer
from av.video.stream import VideoStream

from ipfacediff.errors import UserError
from ipfacediff.files import remove_stale_temporaries

T = TypeVar("T")
_FALLBACK_FPS = Fraction(25)
# Audio codecs an .mp4 holds and players play; anything else is re-encoded to AAC.
_MP4_AUDIO_CODECS = frozenset({"aac", "mp3", "alac", "opus"})
# libx264 quality. 16 keeps pass-through frames of the closeup test clip at >= 45.6 dB PSNR
# against the input (crf 18: 44.4 dB); 16 is the highest crf with >= 45.5 dB there.
DEFAULT_CRF = 16
# Without the macroblock tree, libx264 (even on one thread) encodes the same frames into different
# files from run to run, up to 20/255 apart once decoded: the same seed must give the same video.
X264_PARAMS = "mbtree=0"


@dataclass(frozen=True)
class FrameTimes:
    """When each frame of a video is shown, in the stream's own time base.

    ``pts[i]`` is frame ``i``'s presentation time in ``time_base`` units counted from the first
    frame (so ``pts[0] == 0``), strictly increasing; ``end`` is where the last frame stops. Kept
    exact (integers in the input's time base) so an edit is written with the input's very
    timestamps: a variable frame rate stays as it was, and so does the sync with the audio.
    """

    time_base: Fraction
    pts: tuple[int, ...]
    end: int

    @classmethod
    def constant(cls, count: int, rate: Fraction) -> FrameTimes:
        """``count`` frames ``1 / rate`` apart."""
        return cls(time_base=1 / Fraction(rate), pts=tuple(range(count)), end=count)

    def seconds(self) -> list[float]:
        """Each frame's time in seconds from the first frame."""
        return [float(p * self.time_base) for p in self.pts]

    def stop(self, index: int) -> int:
        """Where frame ``index`` stops being shown: the next frame's time, or ``end``."""
        return self.pts[index + 1] if index + 1 < len(self.pts) else self.end


@dataclass(frozen=True)
class VideoInfo:
    """What :func:`iter_frames` will produce for a file (after rotation): every decoded frame."""

    path: Path
    width: int
    height: int
    fps: float  # the stream's average frame rate
    frame_count: int
    duration: float  # from the first frame's time to the end of the last one, in seconds
    rotation: int  # clockwise degrees a player turns the stored picture (legacy `rotate` tag)
    has_audio: bool
    times: FrameTimes = field(repr=False)


@dataclass(frozen=True, eq=False)
class SourceFrame:
    """An input picture as decoded, in yuv420p, for :func:`write_video` to encode unchanged.

    ``yuv`` is ``av.VideoFrame.to_ndarray(format="yuv420p")``: shape ``(H * 3 // 2, W)``, the Y
    plane then the U and V planes. ``colorspace`` and ``color_range`` are the decoded frame's
    ffmpeg tags (``AVColorSpace`` / ``AVColorRange``; 2 / 0 when unspecified).
    """

    yuv: np.ndarray
    colorspace: int
    color_range: int

    @property
    def width(self) -> int:
        return self.yuv.shape[1]

    @property
    def height(self) -> int:
        return self.yuv.shape[0] * 2 // 3


@dataclass(frozen=True)
class _Colour:
    """Colour tags of an output, and the matrix/range its RGB frames are converted with."""

    colorspace: int  # AVColorSpace; swscale is given the same number, as the reader does
    color_range: int  # AVColorRange: 0 unspecified, 1 limited (MPEG), 2 full (JPEG)
    primaries: int
    trc: int


_BT709 = _Colour(colorspace=1, color_range=1, primaries=1, trc=1)


@dataclass(frozen=True)
class _Timing:
    """Internal reading plan shared by probe and decode, so both agree on every frame."""

    info: VideoInfo
    first_pts: int | None  # the first frame's pts in the stream; None: the packets carry no timestamps


def probe_video(path: str | Path) -> VideoInfo:
    """Describe a video without decoding more than its first frame."""
    return _probe(Path(path)).info


def iter_frames(path: str | Path, *, start: int = 0, count: int | None = None) -> Iterator[np.ndarray]:
    """Yield upright RGB frames ``start, start + 1, ...``: each decoded frame once, in order.

    The file is probed here, before the first ``next()``, so a bad path raises :class:`UserError`
    at the call. ``count=None`` means to the end; ranges past the end are cut short.
    """
    if start < 0 or (count is not None and count < 0):
        raise ValueError(f"start and count must be >= 0, got start={start}, count={count}")
    timing = _probe(Path(path))
    stop = timing.info.frame_count if count is None else min(start + count, timing.info.frame_count)
    rotation = timing.info.rotation
    return _frames(timing, start, stop, lambda frame: rotate_upright(frame.to_ndarray(format="rgb24"), rotation))


def iter_source_frames(path: str | Path) -> Iterator[tuple[np.ndarray, SourceFrame | None]]:
    """Yield ``(rgb, source)`` for every frame of :func:`iter_frames`, in the same order.

    ``source`` is the picture as decoded (:class:`SourceFrame`), for writing a frame back
    unchanged without an RGB round trip, or None when it cannot pass through: a rotated input, a
    pixel format other than yuv420p, or an odd width/height. The file is probed at the call.
    """
    timing = _probe(Path(path))
    rotation = timing.info.rotation
    return _frames(timing, 0, timing.info.frame_count, lambda frame: _rgb_and_source(frame, rotation))


def keep_source_samples(image: np.ndarray, original: np.ndarray, source: SourceFrame) -> SourceFrame:
    """``image`` (RGB: ``original``, the decoded picture of ``source``, with some pixels changed)
    as a SourceFrame holding ``source``'s own samples wherever ``image`` is ``original``: luma
    per pixel, chroma per 2x2 block whose four pixels are all unchanged. An RGB round trip moves
    sharp colour edges by up to 20 levels (chroma is upsampled when read and subsampled again when
    written), so a hand in front of an edited face, or anything else the edit leaves, would change
    where the paste-back kept it exactly."""
    height, width = source.height, source.width
    converted = _rgb_to_yuv(image, source.colorspace, source.color_range).to_ndarray()
    same = (image == original).all(axis=-1)
    converted[:height][same] = source.yuv[:height][same]
    blocks = same.reshape(height // 2, 2, width // 2, 2).all(axis=(1, 3)).ravel()
    chroma = height // 2 * (width // 2)
    for plane in (0, 1):
        start = height * width + plane * chroma
        flat_out, flat_src = converted.reshape(-1), source.yuv.reshape(-1)
        flat_out[start : start + chroma][blocks] = flat_src[start : start + chroma][blocks]
    return SourceFrame(converted, colorspace=source.colorspace, color_range=source.color_range)


def read_frames(path: str | Path, *, start: int = 0, count: int | None = None) -> np.ndarray:
    """All requested frames stacked as ``(N, H, W, 3)``; for short clips and tests."""
    frames = list(iter_frames(path, start=start, count=count))
    if not frames:
        info = probe_video(path)
        return np.zeros((0, info.height, info.width, 3), dtype=np.uint8)
    return np.stack(frames)


def rotate_upright(image: np.ndarray, rotation: int) -> np.ndarray:
    """Turn a stored ``(H, W, ...)`` picture clockwise by ``rotation`` degrees (0/90/180/270).

    Returns a C-contiguous array: ``np.rot90`` gives a negative-stride view that
    ``torch.from_numpy`` and PyAV refuse.
    """
    if rotation % 90:
        raise ValueError(f"rotation must be a multiple of 90 degrees, got {rotation}")
    return np.ascontiguousarray(np.rot90(image, k=-(rotation // 90)))


def write_video(
    path: str | Path,
    frames: Iterable[np.ndarray],
    fps: float,
    *,
    times: FrameTimes | None = None,
    audio_from: str | Path | None = None,
    colour_from: str | Path | None = None,
    crf: int = DEFAULT_CRF,
) -> Path:
    """Encode ``frames`` (all the same size) to an H.264 .mp4 at ``path``.

    Each frame is an RGB uint8 array ``(H, W, 3)`` or a :class:`SourceFrame` to pass through.
    Frames are ``1 / fps`` apart, or shown at ``times`` (a source's :attr:`VideoInfo.times`, so
    that an edit plays exactly as its input; ``fps`` is then only the encoder's nominal rate).
    Colour tags follow ``colour_from``'s video, else ``audio_from``'s video when it has one, else
    BT.709 (see the module docstring). ``frames`` is consumed lazily, one frame at a time. The
    result replaces ``path`` atomically; on any error the temporary file is removed and an
    existing ``path`` is left untouched. Temporary files that killed earlier writes of ``path``
    left beside it are removed once the new file is in place.
    """
    target = Path(path)
    rate = _as_rate(fps)
    time_base = times.time_base if times is not None else 1 / rate
    _check_output_folder(target)
    images = iter(frames)
    first = next(images, None)
    if first is None:
        raise ValueError("write_video got no frames")
    size = _frame_size(_checked_frame(first, 0, None))
    colour = _BT709
    if colour_from is not None:
        colour = _source_colour(Path(colour_from), required=True)
    elif audio_from is not None:
        colour = _source_colour(Path(audio_from), required=False) or _BT709

    started = time.time()
    temp = target.parent / f".{target.name}.tmp-{secrets.token_hex(4)}.mp4"
    with ExitStack() as stack:
        source = stack.enter_context(_open_media(Path(audio_from))) if audio_from else None
        try:
            with _open_output(temp) as output:
                video = _video_stream(output, rate, time_base, crf, colour, width=size[1], height=size[0])
                audio = None
                if source is not None and source.streams.audio:
                    audio = _AudioTrack(source, output)
                _encode(output, video, chain([first], images), size, colour, audio, times)
            os.replace(temp, target)
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
    remove_stale_temporaries(target, rf"\.{re.escape(target.name)}\.tmp-[0-9a-f]{{8}}\.mp4", before=started)
    return target


# --- reading ------------------------------------------------------------------------------------


@contextmanager
def _open_media(path: Path) -> Iterator[InputContainer]:
    """Open ``path`` for reading; a missing or unreadable file becomes a one-line UserError."""
    if not path.exists():
        raise UserError(f"{path} does not exist")
    if path.is_dir():
        raise UserError(f"{path} is a folder, not a video file")
    if path.stat().st_size == 0:
        raise UserError(f"{path} is empty (0 bytes), not a video")
    try:
        container = av.open(str(path))
    except av.FFmpegError as error:
        raise UserError(f"{path} is not a video ffmpeg can read: {_reason(error)}") from None
    with container:
        # ffmpeg's "tty" demuxer renders any text file as an ANSI-art video: not what anyone means.
        if container.format.name == "tty":
            raise UserError(f"{path} is not a video ffmpeg can read: it is a text file")
        yield container


@contextmanager
def _open_input(path: Path) -> Iterator[tuple[InputContainer, VideoStream]]:
    """Open ``path`` for decoding its first video stream."""
    with _open_media(path) as container:
        if not container.streams.video:
            raise UserError(f"{path} has no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        yield container, stream


def _probe(path: Path) -> _Timing:
    with _open_input(path) as (container, stream):
        try:
            first, pts, untimed, end = _scan(container, stream)
        except av.FFmpegError as error:
            raise UserError(f"{path} is not a video ffmpeg can read: {_reason(error)}") from None
        if first is None:
            raise UserError(f"{path} has a video stream but no frame could be decoded")
        has_audio = bool(container.streams.audio)
        rate = stream.average_rate or stream.guessed_rate or _FALLBACK_FPS
        time_base = stream.time_base

    if pts and not untimed:
        times = _frame_times(pts, end, time_base, rate)
        first_pts = pts[0]
    else:  # timestamps missing (rare raw streams): the frames are taken as evenly spaced
        times = FrameTimes.constant(max(1, len(pts) + untimed), rate)
        first_pts = None
    rotation = (-90 * round(first.rotation / 90)) % 360  # PyAV reports counter-clockwise
    width, height = first.width, first.height
    if rotation in (90, 270):
        width, height = height, width
    info = VideoInfo(
        path=path,
        width=width,
        height=height,
        fps=float(rate),
        frame_count=len(times.pts),
        duration=float(times.end * times.time_base),
        rotation=rotation,
        has_audio=has_audio,
        times=times,
    )
    return _Timing(info=info, first_pts=first_pts)


def _scan(container: InputContainer, stream: VideoStream) -> tuple[av.VideoFrame | None, list[int], int, int | None]:
    """The first decoded frame, the pts of every frame shown, the number of packets without one,
    and where the last frame ends, in one pass over the packets. The end is the stream's own
    duration where the container records one (mp4, mov: there a packet's duration is a decode-order
    step, not how long its frame is shown); else (mkv, webm) the latest ``pts + duration``.

    The rotation only shows up on decoded frames, hence the one decode; the rest is demuxing only.
    Packets the demuxer marks as discarded (before an edit list's start) are not shown, so they
    are not frames of the video.
    """
    first = None
    pts: list[int] = []
    untimed = 0
    end = None
    for packet in container.demux(stream):
        if packet.size == 0:  # the empty end-of-stream packet
            continue
        if first is None:
            first = next(iter(packet.decode()), None)
        if packet.is_discard:
            continue
        if packet.pts is None:
            untimed += 1
            continue
        pts.append(packet.pts)
        if packet.duration:
            end = max(end or packet.pts, packet.pts + packet.duration)
    if first is None:  # a decoder that holds frames back until it is flushed
        first = next(iter(stream.codec_context.decode(None)), None)
    if stream.duration and stream.start_time is not None:
        end = stream.start_time + stream.duration
    return first, pts, untimed, end


def _frame_times(pts: list[int], end: int | None, time_base: Fraction, rate: Fraction) -> FrameTimes:
    """The packets' pts in presentation order, from the first frame, made strictly increasing
    (a broken file can repeat a timestamp; a muxer refuses that)."""
    ordered = sorted(pts)
    origin = ordered[0]
    relative = []
    for value in ordered:
        relative.append(max(value - origin, relative[-1] + 1) if relative else 0)
    if end is None or end - origin <= relative[-1]:  # no durations: the last frame lasts as long as one at ``rate``
        end = origin + relative[-1] + max(1, round(1 / (rate * time_base)))
    return FrameTimes(time_base=Fraction(time_base), pts=tuple(relative), end=end - origin)


def _rgb_and_source(frame: av.VideoFrame, rotation: int) -> tuple[np.ndarray, SourceFrame | None]:
    rgb = rotate_upright(frame.to_ndarray(format="rgb24"), rotation)
    if rotation or frame.format.name != "yuv420p" or frame.width % 2 or frame.height % 2:
        return rgb, None
    yuv = frame.to_ndarray(format="yuv420p")
    return rgb, SourceFrame(yuv, colorspace=int(frame.colorspace), color_range=int(frame.color_range))


def _frames(timing: _Timing, start: int, stop: int, convert: Callable[[av.VideoFrame], T]) -> Iterator[T]:
    """``convert`` of frames ``start..stop-1``.

    Each decoded frame is matched to its number by its timestamp. A frame the decoder cannot give
    (a damaged packet) is stood in for by the one shown before it -- by the next one at the very
    start -- so the count always is the probed one.
    """
    info = timing.info
    if start >= stop:
        return
    with _open_input(info.path) as (container, stream):
        try:
            decoded = _decode_from(container, stream, timing, start)
            current = None
            pending = next(decoded, None)
            for k in range(start, stop):
                while pending is not None and pending[0] <= k:
                    current = pending[1]
                    pending = next(decoded, None)
                if current is None:
                    if pending is None:
                        raise UserError(f"{info.path} could not be decoded: no frame came out of the decoder")
                    current = pending[1]
                yield convert(current)
        except av.FFmpegError as error:
            raise UserError(f"{info.path} could not be decoded: {_reason(error)}") from None


def _number(timing: _Timing, frame: av.VideoFrame) -> int | None:
    """The frame's number, found by its timestamp; None when it has none or another one."""
    if timing.first_pts is None or frame.pts is None:
        return None
    pts = timing.info.times.pts
    relative = frame.pts - timing.first_pts
    index = bisect.bisect_left(pts, relative)
    return index if index < len(pts) and pts[index] == relative else None


def _numbered(container: InputContainer, stream: VideoStream, timing: _Timing) -> Iterator[tuple[int, av.VideoFrame]]:
    """Decoded frames with their numbers: by timestamp, else one after the previous frame."""
    position = -1
    for frame in container.decode(stream):
        number = _number(timing, frame)
        position = number if number is not None and number > position else position + 1
        yield position, frame


def _decode_from(
    container: InputContainer, stream: VideoStream, timing: _Timing, start: int
) -> Iterator[tuple[int, av.VideoFrame]]:
    """Decoded frames from the keyframe at or before frame ``start``.

    Seeking avoids decoding the whole prefix when a caller reads a long video in chunks. If the
    demuxer lands after the wanted frame (possible with B-frames or odd indexes) or the frames
    carry no timestamps, decoding restarts from the beginning, which is slow but always right.
    """
    if start == 0 or timing.first_pts is None:
        return _numbered(container, stream, timing)
    container.seek(timing.first_pts + timing.info.times.pts[start], stream=stream, backward=True)
    decoded = _numbered(container, stream, timing)
    first = next(decoded, None)
    if first is not None and _number(timing, first[1]) == first[0] <= start:
        return chain([first], decoded)
    container.seek(stream.start_time or 0, stream=stream, backward=True)
    return _numbered(container, stream, timing)


def _reason(error: av.FFmpegError) -> str:
    """FFmpeg's short explanation, without the errno and file name PyAV adds to ``str()``."""
    return (error.strerror or str(error)).splitlines()[0]


# --- writing ------------------------------------------------------------------------------------


def _as_rate(fps: float) -> Fraction:
    """``fps`` as an exact fraction: 29.97002997 becomes 30000/1001, keeping timestamps exact."""
    try:
        value = float(fps)
    except (TypeError, ValueError):
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"fps must be a positive number, got {fps!r}")
    return Fraction(value).limit_denominator(10_000)


def _check_output_folder(target: Path) -> None:
    folder = target.parent
    if not folder.is_dir():
        raise UserError(f"output folder {folder} does not exist; create it first")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"output folder {folder} is not writable")
    if target.is_dir():
        raise UserError(f"{target} is a folder; give a file name such as {target / 'out.mp4'}")


@contextmanager
def _open_output(path: Path) -> Iterator[OutputContainer]:
    try:
        # faststart puts the index first so browsers (the web demo) can start playing at once.
        output = av.open(str(path), "w", format="mp4", options={"movflags": "+faststart"})
    except av.FFmpegError as error:
        raise UserError(f"cannot write to {path.parent}: {_reason(error)}") from None
    with output:
        yield output


def _checked_frame(
    image: np.ndarray | SourceFrame, index: int, size: tuple[int, int] | None
) -> np.ndarray | SourceFrame:
    """``image`` as an RGB array or a SourceFrame, checked against frame 0's ``(H, W)``."""
    if isinstance(image, SourceFrame):
        yuv = image.yuv
        if yuv.dtype != np.uint8 or yuv.ndim != 2 or yuv.shape[0] % 3 or yuv.shape[1] % 2:
            raise ValueError(f"frame {index} is a SourceFrame without a yuv420p array: {yuv.shape}")
        if image.height % 2:
            raise ValueError(f"frame {index} is a SourceFrame of odd height {image.height}")
    else:
        image = np.asarray(image)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(
                f"frame {index} must be RGB uint8 of shape (H, W, 3) or a SourceFrame, got {image.dtype} {image.shape}"
            )
    if size is not None and _frame_size(image) != size:
        raise ValueError(f"frame {index} has size {_frame_size(image)}, but frame 0 had {size}")
    return image


def _frame_size(image: np.ndarray | SourceFrame) -> tuple[int, int]:
    if isinstance(image, SourceFrame):
        return image.height, image.width
    return image.shape[0], image.shape[1]


def _source_colour(path: Path, *, required: bool) -> _Colour | None:
    """The colour tags of ``path``'s first video frame; None when it has no video (not required)."""
    with _open_media(path) as container:
        if not container.streams.video:
            if required:
                raise UserError(f"{path} has no video stream to take the colours from")
            return None
        stream = container.streams.video[0]
        try:
            frame = next(iter(container.decode(stream)), None)
        except av.FFmpegError as error:
            raise UserError(f"{path} could not be decoded: {_reason(error)}") from None
        tags = frame if frame is not None else stream.codec_context
        return _Colour(
            colorspace=int(tags.colorspace),
            color_range=int(tags.color_range),
            primaries=int(tags.color_primaries),
            trc=int(tags.color_trc),
        )


def _video_stream(
    output: OutputContainer, rate: Fraction, time_base: Fraction, crf: int, colour: _Colour, *, width: int, height: int
) -> VideoStream:
    stream = output.add_stream("libx264", rate=rate, options={"crf": str(crf), "x264-params": X264_PARAMS})
    stream.codec_context.time_base = stream.time_base = time_base  # the muxer may refine it, exactly
    stream.width = width + width % 2
    stream.height = height + height % 2
    stream.pix_fmt = "yuv420p"
    # Tag what _encode converts with, so players and our reader use the same matrix.
    context = stream.codec_context
    context.colorspace = colour.colorspace
    context.color_primaries = colour.primaries
    context.color_trc = colour.trc
    context.color_range = colour.color_range
    return stream


def _full_range(color_range: int) -> bool:
    return color_range == 2  # AVCOL_RANGE_JPEG; unspecified decodes as limited


def _to_yuv(image: np.ndarray | SourceFrame, size: tuple[int, int], colour: _Colour) -> av.VideoFrame:
    """The yuv420p frame to encode: a matching SourceFrame as is, anything else via RGB."""
    if isinstance(image, SourceFrame):
        picture = av.VideoFrame.from_ndarray(image.yuv, format="yuv420p")
        if image.colorspace == colour.colorspace and _full_range(image.color_range) == _full_range(colour.color_range):
            return picture
        # Other colours than the output's: decode it to RGB as the reader would, and convert.
        image = picture.to_ndarray(format="rgb24", src_colorspace=image.colorspace)
    even = np.pad(image, ((0, size[0] % 2), (0, size[1] % 2), (0, 0)), mode="edge")
    return _rgb_to_yuv(even, colour.colorspace, colour.color_range)


def _rgb_to_yuv(image: np.ndarray, colorspace: int, color_range: int) -> av.VideoFrame:
    frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
    return frame.reformat(
        format="yuv420p",
        dst_colorspace=colorspace,  # the number the reader hands swscale, see _Colour
        dst_color_range="JPEG" if _full_range(color_range) else "MPEG",
    )


def _encode(
    output: OutputContainer,
    stream: VideoStream,
    images: Iterator[np.ndarray | SourceFrame],
    size: tuple[int, int],
    colour: _Colour,
    audio: _AudioTrack | None,
    times: FrameTimes | None,
) -> None:
    """Encode and mux every image at its time, feeding the audio up to the video's current end."""
    time_base = stream.codec_context.time_base
    # How long each frame is shown, by pts, until its packet comes out of the encoder: libx264
    # gives packets the nominal 1 / rate, and the muxer takes the last frame's length from it.
    durations: dict[int, int] = {}

    def mux(packets: list[av.Packet]) -> None:
        for packet in packets:
            packet.duration = durations.pop(packet.pts, packet.duration)
        output.mux(packets)

    end = 0
    for index, image in enumerate(images):
        if times is not None and index >= len(times.pts):
            raise ValueError(f"write_video got more frames than the {len(times.pts)} timestamps of times")
        pts, end = (index, index + 1) if times is None else (times.pts[index], times.stop(index))
        frame = _to_yuv(_checked_frame(image, index, size), size, colour)
        frame.pts = pts
        frame.time_base = time_base
        durations[pts] = end - pts
        mux(stream.encode(frame))
        if audio is not None:
            audio.mux_until(end * time_base)
    mux(stream.encode())
    if audio is not None:
        audio.mux_until(end * time_base)


class _AudioTrack:
    """The first audio stream of ``source``, muxed into ``output`` in step with the video.

    Packets go to the muxer as the video advances rather than all at the end, so the file stays
    interleaved and nothing piles up in memory. Times are shifted so that the source's first video
    frame (when it has video) lines up with the output's first frame.
    """

    def __init__(self, source: InputContainer, output: OutputContainer) -> None:
        self._output = output
        in_stream = source.streams.audio[0]
        video = source.streams.video[0] if source.streams.video else None
        offset = 0.0
        if video is not None and video.start_time is not None:
            offset = float(video.start_time * video.time_base)
        if in_stream.codec_context.codec.canonical_name in _MP4_AUDIO_CODECS:
            out_stream = output.add_stream_from_template(in_stream)
            self._packets = _copied_packets(source, in_stream, out_stream, offset)
        else:
            rates = av.Codec("aac", "w").audio_rates or []
            out_stream = output.add_stream(
                "aac",
                rate=in_stream.rate if in_stream.rate in rates else 48_000,
                layout="stereo" if in_stream.channels > 1 else "mono",
            )
            self._packets = _reencoded_packets(source, in_stream, out_stream, offset)
        self._pending = None

    def mux_until(self, end: Fraction) -> None:
        """Mux the packets whose midpoint lies before ``end`` seconds; later ones wait.

        The midpoint rule makes the audio end within half a packet (about 10-25 ms) of the video.
        """
        while True:
            if self._pending is None:
                self._pending = next(self._packets, None)
                if self._pending is None:
                    return
            packet = self._pending
            if (packet.pts + Fraction(packet.duration, 2)) * packet.time_base >= end:
                return
            self._output.mux(packet)
            self._pending = None


def _copied_packets(
    source: InputContainer, in_stream: AudioStream, out_stream: AudioStream, offset: float
) -> Iterator[av.Packet]:
    """The compressed audio packets, retimed for the output (no quality loss)."""
    shift = round(offset / in_stream.time_base)
    for packet in source.demux(in_stream):
        if packet.pts is None:  # the empty end-of-stream packet
            continue
        packet.pts -= shift
        if packet.dts is not None:
            packet.dts -= shift
        packet.stream = out_stream
        yield packet


def _reencoded_packets(
    source: InputContainer, in_stream: AudioStream, out_stream: AudioStream, offset: float
) -> Iterator[av.Packet]:
    """The audio decoded and encoded to AAC (the encoder resamples and re-frames it)."""
    for frame in source.decode(in_stream):
        if frame.pts is not None:
            frame.pts -= round(offset / frame.time_base)
        yield from out_stream.encode(frame)
    yield from out_stream.encode(None)
