"""Video files in and out: RGB frames one at a time, written back as H.264 with the source audio.

Reading
    Any file ffmpeg can decode is accepted. Frames come out as RGB ``uint8`` arrays of shape
    ``(H, W, 3)``, one at a time, so a long video never sits in memory.

    *Constant output rate.* Diffusion editing and temporal smoothing assume evenly spaced frames,
    but phone videos are often variable frame rate (VFR). Every video is therefore resampled to a
    constant rate ``fps``: the stream's average frame rate, else ffmpeg's guessed rate, else 25.
    Output frame ``k`` is the decoded frame whose presentation time (counted from the first frame)
    is the latest at or before ``k / fps`` -- the frame a player would be showing at that moment --
    so frames are repeated or dropped as needed. "At or before" allows a slack of a quarter frame
    interval, because containers round timestamps (WebM/MKV store milliseconds: at 30 fps the
    third frame sits at 67 ms, after its nominal 66.7 ms) and phones jitter by a few ms; without
    the slack such a file would get a duplicated and a dropped frame at every rounding.
    ``frame_count`` is the number of ``k`` whose time ``k / fps`` lies inside the stream's
    duration (same slack). A constant-frame-rate file thus yields exactly its own frames.

    *Rotation.* Phones store the picture sideways and record how to turn it in a display matrix.
    Frames are rotated upright (multiples of 90 degrees; mirror flags are ignored) and
    width/height are the upright ones. Non-square pixels (sample aspect ratio) are not resampled.

Writing
    H.264 (libx264, ``crf``) in yuv420p, in an .mp4 container whatever the target's suffix.

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
    renamed onto it only when complete, so a crash never leaves a half-written video behind.
    The audio of ``audio_from`` is copied as is when mp4 can carry its codec, else re-encoded to
    AAC, and cut so that it ends with the video (to within half an audio packet, well under a
    frame). Audio shorter than the video is not padded.
"""

from __future__ import annotations

import math
import os
import secrets
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
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

# Slack of the "latest frame at or before k / fps" rule, in frame intervals (see module docstring).
_SLACK = 0.25
T = TypeVar("T")
_FALLBACK_FPS = Fraction(25)
# Audio codecs an .mp4 holds and players play; anything else is re-encoded to AAC.
_MP4_AUDIO_CODECS = frozenset({"aac", "mp3", "alac", "opus"})
# libx264 quality. 16 keeps pass-through frames of the closeup test clip at >= 45.6 dB PSNR
# against the input (crf 18: 44.4 dB); 16 is the highest crf with >= 45.5 dB there.
DEFAULT_CRF = 16


@dataclass(frozen=True)
class VideoInfo:
    """What :func:`iter_frames` will produce for a file (after rotation and VFR resampling)."""

    path: Path
    width: int
    height: int
    fps: float
    frame_count: int
    duration: float  # frame_count / fps: the length of the resampled video
    rotation: int  # clockwise degrees a player turns the stored picture (legacy `rotate` tag)
    has_audio: bool


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
    rate: Fraction
    start_time: float  # presentation time of the first frame, in seconds


def probe_video(path: str | Path) -> VideoInfo:
    """Describe a video without decoding more than its first frame."""
    return _probe(Path(path)).info


def iter_frames(path: str | Path, *, start: int = 0, count: int | None = None) -> Iterator[np.ndarray]:
    """Yield upright RGB frames ``start, start + 1, ...`` of the constant-rate video.

    The file is probed here, before the first ``next()``, so a bad path raises :class:`UserError`
    at the call. ``count=None`` means to the end; ranges past the end are cut short.
    """
    if start < 0 or (count is not None and count < 0):
        raise ValueError(f"start and count must be >= 0, got start={start}, count={count}")
    timing = _probe(Path(path))
    stop = timing.info.frame_count if count is None else min(start + count, timing.info.frame_count)
    return _resampled_frames(timing, start, stop)


def iter_source_frames(path: str | Path) -> Iterator[tuple[np.ndarray, SourceFrame | None]]:
    """Yield ``(rgb, source)`` for every frame of :func:`iter_frames`, in the same order.

    ``source`` is the picture as decoded (:class:`SourceFrame`), for writing a frame back
    unchanged without an RGB round trip, or None when it cannot pass through: a rotated input, a
    pixel format other than yuv420p, or an odd width/height. The file is probed at the call.
    """
    timing = _probe(Path(path))
    rotation = timing.info.rotation
    return _resampled(timing, 0, timing.info.frame_count, lambda frame: _rgb_and_source(frame, rotation))


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
    audio_from: str | Path | None = None,
    colour_from: str | Path | None = None,
    crf: int = DEFAULT_CRF,
) -> Path:
    """Encode ``frames`` (all the same size) to an H.264 .mp4 at ``path``.

    Each frame is an RGB uint8 array ``(H, W, 3)`` or a :class:`SourceFrame` to pass through.
    Colour tags follow ``colour_from``'s video, else ``audio_from``'s video when it has one, else
    BT.709 (see the module docstring). ``frames`` is consumed lazily, one frame at a time. The
    result replaces ``path`` atomically; on any error the temporary file is removed and an
    existing ``path`` is left untouched.
    """
    target = Path(path)
    rate = _as_rate(fps)
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

    temp = target.parent / f".{target.name}.tmp-{secrets.token_hex(4)}.mp4"
    with ExitStack() as stack:
        source = stack.enter_context(_open_media(Path(audio_from))) if audio_from else None
        try:
            with _open_output(temp) as output:
                video = _video_stream(output, rate, crf, colour, width=size[1], height=size[0])
                audio = None
                if source is not None and source.streams.audio:
                    audio = _AudioTrack(source, output)
                _encode(output, video, chain([first], images), size, colour, audio)
            os.replace(temp, target)
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
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
        rate = stream.average_rate or stream.guessed_rate or _FALLBACK_FPS
        try:
            first, end = _first_frame_and_end(container, stream, rate)
        except av.FFmpegError as error:
            raise UserError(f"{path} is not a video ffmpeg can read: {_reason(error)}") from None
        if first is None:
            raise UserError(f"{path} has a video stream but no frame could be decoded")
        has_audio = bool(container.streams.audio)

    start_time = first.time or 0.0
    frame_count = max(1, math.ceil((end - start_time) * rate - _SLACK))
    rotation = (-90 * round(first.rotation / 90)) % 360  # PyAV reports counter-clockwise
    width, height = first.width, first.height
    if rotation in (90, 270):
        width, height = height, width
    info = VideoInfo(
        path=path,
        width=width,
        height=height,
        fps=float(rate),
        frame_count=frame_count,
        duration=float(frame_count / rate),
        rotation=rotation,
        has_audio=has_audio,
    )
    return _Timing(info=info, rate=rate, start_time=start_time)


def _first_frame_and_end(
    container: InputContainer, stream: VideoStream, rate: Fraction
) -> tuple[av.VideoFrame | None, float]:
    """Decode the first frame and find where the stream ends, in one pass over the packets.

    The rotation only shows up on decoded frames, hence the decode. The end comes from the
    stream's duration when the container records one (mp4, mov); otherwise (mkv, webm) the
    remaining packets are read -- demuxing only, no decoding -- for the last ``pts + duration``.
    """
    first = None
    end = None
    if stream.duration is not None and stream.start_time is not None:
        end = float((stream.start_time + stream.duration) * stream.time_base)
    packet_end = 0.0
    for packet in container.demux(stream):
        if first is None:
            first = next(iter(packet.decode()), None)
        if packet.pts is not None:
            length = packet.duration * packet.time_base if packet.duration else 1 / rate
            packet_end = max(packet_end, float(packet.pts * packet.time_base + length))
        if first is not None and end is not None:
            break
    return first, packet_end if end is None else end


def _resampled_frames(timing: _Timing, start: int, stop: int) -> Iterator[np.ndarray]:
    """Frames ``start..stop-1`` of the constant-rate video (see the module docstring)."""
    rotation = timing.info.rotation
    return _resampled(timing, start, stop, lambda frame: rotate_upright(frame.to_ndarray(format="rgb24"), rotation))


def _rgb_and_source(frame: av.VideoFrame, rotation: int) -> tuple[np.ndarray, SourceFrame | None]:
    rgb = rotate_upright(frame.to_ndarray(format="rgb24"), rotation)
    if rotation or frame.format.name != "yuv420p" or frame.width % 2 or frame.height % 2:
        return rgb, None
    yuv = frame.to_ndarray(format="yuv420p")
    return rgb, SourceFrame(yuv, colorspace=int(frame.colorspace), color_range=int(frame.color_range))


def _resampled(timing: _Timing, start: int, stop: int, convert: Callable[[av.VideoFrame], T]) -> Iterator[T]:
    """``convert`` of each decoded frame shown at output frames ``start..stop-1``."""
    info = timing.info
    with _open_input(info.path) as (container, stream):
        try:
            decoded = _decode_from(container, stream, timing, start)
            current = None
            pending = next(decoded, None)
            for k in range(start, stop):
                while pending is not None and pending[0] <= k + _SLACK:
                    current = pending[1]
                    pending = next(decoded, None)
                # Past the last decodable frame, the last one stays on screen.
                yield convert(current)
        except av.FFmpegError as error:
            raise UserError(f"{info.path} could not be decoded: {_reason(error)}") from None


def _positions(
    container: InputContainer, stream: VideoStream, timing: _Timing
) -> Iterator[tuple[float, av.VideoFrame]]:
    """Decoded frames with their time in output frame intervals since the first frame.

    A frame without a timestamp (rare raw streams) is placed one interval after the previous.
    """
    position = -1.0
    for frame in container.decode(stream):
        if frame.time is None:
            position += 1
        else:
            position = (frame.time - timing.start_time) * float(timing.rate)
        yield position, frame


def _decode_from(
    container: InputContainer, stream: VideoStream, timing: _Timing, start: int
) -> Iterator[tuple[float, av.VideoFrame]]:
    """Decoded frames from the keyframe at or before output frame ``start``.

    Seeking avoids decoding the whole prefix when a caller reads a long video in chunks. If the
    demuxer lands after the wanted time (possible with B-frames or odd indexes) or frames carry no
    timestamps, decoding restarts from the beginning, which is slow but always right.
    """
    if start == 0:
        return _positions(container, stream, timing)
    # The frame shown at `start` is the latest one up to start + slack, so no keyframe lies
    # between it and that time: the keyframe at or before that time precedes it.
    target = timing.start_time + (start + _SLACK) / timing.rate
    container.seek(math.floor(target / stream.time_base), stream=stream, backward=True)
    decoded = _positions(container, stream, timing)
    first = next(decoded, None)
    if first is not None and first[1].time is not None and first[0] <= start + _SLACK:
        return chain([first], decoded)
    container.seek(stream.start_time or 0, stream=stream, backward=True)
    return _positions(container, stream, timing)


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
    output: OutputContainer, rate: Fraction, crf: int, colour: _Colour, *, width: int, height: int
) -> VideoStream:
    stream = output.add_stream("libx264", rate=rate, options={"crf": str(crf)})
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
    frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(even), format="rgb24")
    return frame.reformat(
        format="yuv420p",
        dst_colorspace=colour.colorspace,  # the number the reader hands swscale, see _Colour
        dst_color_range="JPEG" if _full_range(colour.color_range) else "MPEG",
    )


def _encode(
    output: OutputContainer,
    stream: VideoStream,
    images: Iterator[np.ndarray | SourceFrame],
    size: tuple[int, int],
    colour: _Colour,
    audio: _AudioTrack | None,
) -> None:
    """Encode and mux every image, feeding the audio up to the video's current end."""
    time_base = 1 / stream.codec_context.framerate
    count = 0
    for index, image in enumerate(images):
        frame = _to_yuv(_checked_frame(image, index, size), size, colour)
        frame.pts = index
        frame.time_base = time_base
        output.mux(stream.encode(frame))
        count = index + 1
        if audio is not None:
            audio.mux_until(count * time_base)
    output.mux(stream.encode())
    if audio is not None:
        audio.mux_until(count * time_base)


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
