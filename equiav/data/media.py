"""ffmpeg-based media access: locate the binary, probe, check and decode clips.

Every function here runs the ``ffmpeg`` command line (no ffprobe, no Python bindings), so
the only runtime dependency is one binary: ``$EQUIAV_FFMPEG``, an ``ffmpeg`` on ``PATH``,
or the static build shipped by ``imageio-ffmpeg``.

:func:`decode_clip` is the feature stage's decoder: ONE ffmpeg process per clip gives the
16 kHz mono waveform and ``num_frames`` uniformly spaced, resized and centre-cropped RGB frames
(JPEG-encoded here), plus the input's description for :class:`MediaInfo`.
"""

from __future__ import annotations

import math
import os
import re
import secrets
import shutil
import subprocess
import threading
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
import torchvision.io

from equiav.data.status import DECODE_ERROR, NO_AUDIO, NO_VIDEO, TOO_SHORT, VOCABULARY, classify_error

__all__ = [
    "DecodedClip",
    "MediaError",
    "MediaInfo",
    "check_media",
    "decode_clip",
    "ffmpeg_bin_dir",
    "failure_status",
    "ffmpeg_exe",
    "probe",
]

# Audio decoded before the requested offset and thrown away (seconds). It gives the frame
# selection a frame before the clip start to choose from (the nearest frame may precede the
# offset by up to half a frame interval) and lets the AAC decoder settle after the seek: the
# first frame decoded after a seek lacks its overlap-add partner.
_PRE_ROLL = 0.5

# ffmpeg's log lines under `-loglevel level+info`: "[ctx @ 0x..] [level] text" or "[level] text".
_LOG_LINE = re.compile(r"^(?:\[(?P<ctx>[^\]]*?)(?: @ 0x[0-9a-f]+)?\] )?\[(?P<level>[a-z]+)\] (?P<text>.*)$")
_ERROR_LEVELS = frozenset({"error", "fatal", "panic"})
_DURATION = re.compile(r"Duration: (?:(\d+):(\d+):(\d+(?:\.\d+)?)|N/A)")
_STREAM = re.compile(r"Stream #0:\d+\S*: (?P<kind>Audio|Video): (?P<desc>.*)")
_SIZE = re.compile(r", (\d+)x(\d+)\b")
_HZ = re.compile(r"\b(\d+) Hz\b")
_RATE = re.compile(r"\b(\d+(?:\.\d+)?)(k?) (fps|tbr)\b")


@dataclass(frozen=True)
class MediaInfo:
    """What ffmpeg says about an input: duration in seconds (container), first audio stream's
    sample rate in Hz, first video stream's frame rate (frames/s) and size in pixels."""

    duration: float | None
    has_audio: bool
    has_video: bool
    sample_rate: int | None
    fps: float | None
    width: int | None
    height: int | None


class MediaError(RuntimeError):
    """A clip that cannot be used, with its reason from :mod:`equiav.data.status`."""

    def __init__(self, status: str, detail: str) -> None:
        if status not in VOCABULARY:
            raise ValueError(f"MediaError status {status!r} is not one of {', '.join(VOCABULARY)}")
        super().__init__(f"{status}: {detail}")
        self.status = status
        self.detail = detail

    def __reduce__(self):  # keep (status, detail) across process boundaries
        return (type(self), (self.status, self.detail))


@dataclass
class DecodedClip:
    """One decoded clip: ``waveform`` float32 [n] mono at the requested sample rate,
    ``frames`` num_frames JPEG images of frame_size x frame_size RGB, and the input's info."""

    waveform: np.ndarray
    frames: list[bytes]
    info: MediaInfo


def ffmpeg_exe() -> str:
    """The ffmpeg binary: ``$EQUIAV_FFMPEG``, else ``ffmpeg`` on PATH, else imageio-ffmpeg's."""
    configured = os.environ.get("EQUIAV_FFMPEG")
    if configured:
        if not (os.path.isfile(configured) and os.access(configured, os.X_OK)):
            raise FileNotFoundError(
                f"EQUIAV_FFMPEG={configured!r} is not an executable file; point it at an ffmpeg binary or unset it"
            )
        return configured
    on_path = shutil.which("ffmpeg")
    if on_path:
        return on_path
    try:
        import imageio_ffmpeg
    except ImportError as err:  # pragma: no cover - imageio-ffmpeg is a declared dependency
        raise FileNotFoundError(
            "no ffmpeg found: set EQUIAV_FFMPEG, put ffmpeg on PATH or `pip install imageio-ffmpeg`"
        ) from err
    return imageio_ffmpeg.get_ffmpeg_exe()


def ffmpeg_bin_dir() -> Path:
    """A directory holding an executable named exactly ``ffmpeg`` (for tools such as yt-dlp
    that look the binary up by that name on PATH): a symlink to :func:`ffmpeg_exe` under
    ``$XDG_CACHE_HOME/equiav/bin`` (default ``~/.cache/equiav/bin``)."""
    # realpath: once this folder is on PATH, ffmpeg_exe() finds the link itself.
    target = os.path.realpath(ffmpeg_exe())
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    bin_dir = Path(cache) / "equiav" / "bin"
    link = bin_dir / "ffmpeg"
    if os.path.islink(link) and os.readlink(link) == target:
        return bin_dir
    bin_dir.mkdir(parents=True, exist_ok=True)
    # Build the link under a unique name and rename it over the old one: concurrent jobs
    # never see a missing or half-made `ffmpeg`.
    tmp = bin_dir / f".ffmpeg.{os.getpid()}.{secrets.token_hex(4)}"
    os.symlink(target, tmp)
    os.replace(tmp, link)
    return bin_dir


def _log_lines(stderr: str) -> list[tuple[str, str, str]]:
    """Split ``-loglevel level+info`` output into (context, level, text) triples."""
    lines = []
    for raw in stderr.splitlines():
        match = _LOG_LINE.match(raw)
        if match:
            lines.append((match["ctx"] or "", match["level"], match["text"]))
        elif raw.strip():
            lines.append(("", "info", raw))
    return lines


def _first_error(lines: list[tuple[str, str, str]]) -> str | None:
    for ctx, level, text in lines:
        if level in _ERROR_LEVELS:
            return f"{ctx}: {text}" if ctx else text
    return None


def _parse_rate(desc: str) -> float | None:
    # ffmpeg prints "25 fps", "29.97 fps", "1k fps"; without an average rate only "tbr".
    rates = {unit: float(value) * (1000 if kilo else 1) for value, kilo, unit in _RATE.findall(desc)}
    return rates.get("fps") or rates.get("tbr")


def _parse_info(lines: list[tuple[str, str, str]]) -> MediaInfo | None:
    """The description of input #0 from ffmpeg's log, or None when ffmpeg did not open it."""
    in_input = False
    found = False
    duration = sample_rate = fps = width = height = None
    has_audio = has_video = False
    for _, level, text in lines:
        if level != "info":
            continue
        if text.startswith("Input #0"):
            in_input = found = True
            continue
        if text.startswith(("Input #", "Output #", "Stream mapping")):
            in_input = False
        if not in_input:
            continue
        if duration is None and (match := _DURATION.search(text)) and match[1] is not None:
            duration = int(match[1]) * 3600 + int(match[2]) * 60 + float(match[3])
        stream = _STREAM.search(text)
        if stream is None:
            continue
        desc = stream["desc"]
        if stream["kind"] == "Audio" and not has_audio:
            has_audio = True
            if hz := _HZ.search(desc):
                sample_rate = int(hz[1])
        # Cover art in audio files is a one-picture "video" stream: not a video.
        elif stream["kind"] == "Video" and not has_video and "(attached pic)" not in desc:
            has_video = True
            fps = _parse_rate(desc)
            if size := _SIZE.search(desc):
                width, height = int(size[1]), int(size[2])
    if not found:
        return None
    return MediaInfo(duration, has_audio, has_video, sample_rate, fps, width, height)


def _run(cmd: list[str]) -> tuple[int, bytes, str]:
    proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, check=False)
    return proc.returncode, proc.stdout, proc.stderr.decode("utf-8", "replace")


def _base_cmd() -> list[str]:
    # level+info prefixes every line with its level, so one run gives both the input
    # description (info) and the errors, told apart reliably.
    return [ffmpeg_exe(), "-hide_banner", "-nostdin", "-nostats", "-loglevel", "repeat+level+info"]


def _existing(path: str | os.PathLike[str]) -> str:
    """A local file that must exist, or a URL (http, file, ...) that ffmpeg opens itself."""
    path = os.fspath(path)
    if "://" not in path and not os.path.isfile(path):
        raise FileNotFoundError(f"media file {path!r} does not exist")
    return path


def probe(path: str | os.PathLike[str]) -> MediaInfo:
    """Describe a media file from ``ffmpeg -i`` (header only, no decoding).

    Raises MediaError when ffmpeg cannot open it: decode-error for a corrupt file or a truncated
    header, the network's outcome (transient) or unavailable for a URL that cannot be read."""
    path = _existing(path)
    _, _, stderr = _run([*_base_cmd(), "-i", path])  # exits 1: no output file, by design
    lines = _log_lines(stderr)
    info = _parse_info(lines)
    if info is None:
        detail = _first_error(lines) or f"ffmpeg could not open {path!r}"
        raise MediaError(failure_status(detail), detail)
    return info


def check_media(
    path: str | os.PathLike[str], start: float = 0.0, duration: float | None = None
) -> tuple[MediaInfo, dict[str, float]]:
    """Probe a file (or URL) and read every packet of ``[start, start + duration)`` without
    decoding it (``-c copy``; all of it by default).

    Returns the info and, per stream kind ("audio", "video"; the first stream of each), the
    seconds of it present after ``start``: the end of its last packet. Raises MediaError when
    ffmpeg logs an error (a truncated file logs e.g. "partial file") or exits non-zero, with
    the outcome its first error line stands for (a network fault stays transient)."""
    path = _existing(path)
    cmd = _base_cmd()
    if start > 0:
        cmd += ["-ss", _seconds(start)]
    if duration is not None:
        cmd += ["-t", _seconds(duration)]
    # framecrc lists every packet with its stream, time and duration: per-stream coverage.
    cmd += ["-i", path, "-map", "0:a:0?", "-map", "0:V:0?", "-c", "copy", "-f", "framecrc", "pipe:1"]
    code, listing, stderr = _run(cmd)
    lines = _log_lines(stderr)
    info = _parse_info(lines)
    error = _first_error(lines)
    if info is None or error is not None or code != 0:
        detail = error or f"ffmpeg exited with status {code} reading {path!r}"
        raise MediaError(failure_status(detail), detail)
    return info, _present(listing.decode("ascii", "replace"))


def _present(listing: str) -> dict[str, float]:
    """Seconds covered by each stream kind of a framecrc listing (the end of its last packet)."""
    kinds: dict[str, str] = {}
    bases: dict[str, Fraction] = {}
    present = {"audio": 0.0, "video": 0.0}
    for line in listing.splitlines():
        if line.startswith("#"):
            key, _, value = line[1:].partition(":")
            name, _, index = key.partition(" ")
            if name == "tb":
                bases[index] = Fraction(value.strip())
            elif name == "media_type":
                kinds[index] = value.strip()
            continue
        fields = [f.strip() for f in line.split(",")]
        if len(fields) < 4 or fields[0] not in bases or kinds.get(fields[0]) not in present:
            continue
        stamp = fields[2] if fields[2].lstrip("-").isdigit() else fields[1]  # pts, else dts
        if not (stamp.lstrip("-").isdigit() and fields[3].isdigit()):
            continue
        end = float((int(stamp) + int(fields[3])) * bases[fields[0]])
        kind = kinds[fields[0]]
        present[kind] = max(present[kind], end)
    return present


def failure_status(detail: str) -> str:
    """The outcome of an ffmpeg failure: a network fault is transient, a missing source is
    unavailable, and anything else ffmpeg cannot read is damaged (decode-error)."""
    return classify_error(detail, default=DECODE_ERROR)


def _seconds(value: float) -> str:
    return f"{value:.6f}"


def _video_filter(pre_roll: float, span: float, num_frames: int, frame_size: int) -> str:
    """Pick the frames nearest to pre_roll + k*span/num_frames, scale and centre-crop them.

    With h half a frame interval (from FR, the stream's frame rate; 0 when unknown):
    1. setpts + trim drop every frame earlier than pre_roll - h: none of them is the nearest
       to any frame time, and a video that ends there yields no frame at all (NO_VIDEO).
    2. tpad holds the last frame if the video stops before the clip does.
    3. setpts puts the clip start at t=0 with every frame h early; the fps filter with
       round=up then gives output slot k the latest frame whose shifted time is
       <= k*span/num_frames, i.e. the frame nearest to that time (ties: the later frame).
       start_time=0 makes slot 0 exist when the first kept frame comes after the clip start.
    4. Short side to frame_size (bicubic; the long side keeps the aspect ratio), then the
       centre frame_size x frame_size.
    Expressions are quoted: their commas are not filter separators.
    """
    rate = Fraction(num_frames) / Fraction(span).limit_denominator(1_000_000)
    rate = rate.limit_denominator(1_000_000)
    half = "if(gt(FR,0),0.5/FR,0)"
    return ",".join(
        [
            f"setpts='PTS-({_seconds(pre_roll)}-{half})/TB'",
            "trim=start=0",
            f"tpad=stop_mode=clone:stop_duration={_seconds(span)}",
            f"setpts='PTS-2*{half}/TB'",
            f"fps=fps={rate.numerator}/{rate.denominator}:start_time=0:round=up",
            f"scale={frame_size}:{frame_size}:force_original_aspect_ratio=increase:flags=bicubic",
            f"crop={frame_size}:{frame_size}",
        ]
    )


def _read_all(fd: int, sink: list[bytes]) -> None:
    with os.fdopen(fd, "rb", buffering=0) as pipe:
        while chunk := pipe.read(1 << 20):
            sink.append(chunk)


def _decode_once(
    path: str,
    offset: float,
    duration: float | None,
    span: float | None,
    *,
    sample_rate: int,
    num_frames: int,
    frame_size: int,
) -> tuple[MediaInfo, np.ndarray, bytes]:
    """One ffmpeg run: (info, float32 mono waveform, raw RGB24 frames concatenated)."""
    pre_roll = min(offset, _PRE_ROLL)
    start = offset - pre_roll
    cmd = [*_base_cmd(), "-threads", "1", "-filter_threads", "1"]
    if start > 0:
        cmd += ["-ss", _seconds(start)]
    if duration is not None:
        cmd += ["-t", _seconds(pre_roll + duration)]
    cmd += ["-i", path, "-map", "0:a:0"]
    if pre_roll > 0:
        cmd += ["-af", f"atrim=start={_seconds(pre_roll)},asetpts=PTS-STARTPTS"]
    # rematrix_maxval=1 makes the downmix the channel mean, (L+R)/2 for stereo; without it a
    # float output gets 0.707*(L+R), 3 dB louder than the s16 wav of `ffmpeg -ac 1 x.wav`
    # that the published normalisation statistics were computed from.
    cmd += ["-ac", "1", "-ar", str(sample_rate), "-rematrix_maxval", "1"]
    cmd += ["-c:a", "pcm_f32le", "-f", "f32le", "pipe:1"]

    video_r = video_w = -1
    if num_frames > 0:
        assert span is not None
        video_r, video_w = os.pipe()
        # 0:V skips cover art; the raw frames go to a second pipe so audio and video never
        # have to be told apart in one byte stream.
        cmd += ["-map", "0:V:0", "-vf", _video_filter(pre_roll, span, num_frames, frame_size)]
        cmd += ["-frames:v", str(num_frames), "-c:v", "rawvideo", "-pix_fmt", "rgb24", "-f", "rawvideo"]
        cmd += [f"pipe:{video_w}"]

    chunks: list[bytes] = []
    reader = None
    try:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            pass_fds=(video_w,) if num_frames > 0 else (),
        )
    finally:
        if video_w >= 0:
            os.close(video_w)  # only the child writes; our copy would hide EOF
    if video_r >= 0:
        # ffmpeg writes both outputs as it goes; a full video pipe would stall the audio one.
        reader = threading.Thread(target=_read_all, args=(video_r, chunks), daemon=True)
        reader.start()
    audio, stderr_bytes = proc.communicate()
    if reader is not None:
        reader.join()

    lines = _log_lines(stderr_bytes.decode("utf-8", "replace"))
    info = _parse_info(lines)
    if proc.returncode != 0 or info is None:
        if info is not None and not info.has_audio:
            raise MediaError(NO_AUDIO, f"{path!r} has no audio stream")
        if info is not None and num_frames > 0 and not info.has_video:
            raise MediaError(NO_VIDEO, f"{path!r} has no video stream (use num_frames=0 for audio-only data)")
        detail = _first_error(lines) or f"ffmpeg exited with status {proc.returncode}"
        raise MediaError(failure_status(detail), f"{path!r}: {detail}")
    waveform = np.frombuffer(audio, dtype="<f4").astype(np.float32)  # copy: writable, native order
    return info, waveform, b"".join(chunks)


def decode_clip(
    path: str | os.PathLike[str],
    offset: float,
    duration: float | None,
    *,
    sample_rate: int = 16000,
    num_frames: int = 10,
    frame_size: int = 224,
    jpeg_quality: int = 90,
) -> DecodedClip:
    """Decode [offset, offset + duration) seconds of a file (to its end when duration is None).

    Audio: float32 [n] mono at ``sample_rate`` Hz. Video (when num_frames > 0): frame k is the
    frame nearest to offset + k*T/num_frames, where T is ``duration`` when the media is that
    long and otherwise what is present after offset; each is scaled (bicubic) so its short
    side is ``frame_size``, centre-cropped to frame_size x frame_size and JPEG-encoded. A video
    that ends early repeats its last frame.

    One ffmpeg process decodes both. Two run only when T is not known beforehand
    (duration None with frames: a header-only probe first) or the media turns out shorter
    than ``duration`` by more than a frame (the frames are then picked again over what exists).

    Raises MediaError with NO_AUDIO, NO_VIDEO, TOO_SHORT (nothing after offset) or
    DECODE_ERROR (ffmpeg failed; the detail is its first error line).
    """
    path = _existing(path)
    if not (math.isfinite(offset) and offset >= 0):
        raise ValueError(f"offset must be a finite number of seconds >= 0, got {offset!r}")
    if duration is not None and not (math.isfinite(duration) and duration > 0):
        raise ValueError(f"duration must be > 0 seconds or None (to the end), got {duration!r}")
    if num_frames < 0 or frame_size <= 0 or sample_rate <= 0:
        raise ValueError(
            f"need num_frames >= 0, frame_size > 0, sample_rate > 0; got {num_frames}, {frame_size}, {sample_rate}"
        )

    span = duration
    if num_frames > 0 and duration is None:
        # The frame times depend on T, which the filter graph must know before decoding.
        span = _span_after(probe(path), offset, path)
    decode = dict(sample_rate=sample_rate, num_frames=num_frames, frame_size=frame_size)
    info, waveform, raw = _decode_once(path, offset, duration, span, **decode)
    if num_frames > 0 and duration is not None and info.duration is not None:
        present = _span_after(info, offset, path)
        # Within one frame interval of the requested length the frame times move by less than
        # a frame; beyond it, pick the frames again over what is actually there.
        if present < duration - 1.0 / (info.fps or 10.0):
            info, waveform, raw = _decode_once(path, offset, duration, present, **decode)
    if waveform.size == 0:
        raise MediaError(TOO_SHORT, f"{path!r} has no audio after offset {offset} s (media: {info.duration} s)")
    frames = _encode_frames(raw, num_frames, frame_size, jpeg_quality, path) if num_frames > 0 else []
    return DecodedClip(waveform=waveform, frames=frames, info=info)


def _span_after(info: MediaInfo, offset: float, path: str) -> float:
    """Seconds of media after ``offset`` according to the container's duration."""
    if info.duration is None:
        raise MediaError(DECODE_ERROR, f"{path!r} reports no duration; pass the clip's duration explicitly")
    span = info.duration - offset
    if span <= 0:
        raise MediaError(TOO_SHORT, f"offset {offset} s is past the end of {path!r} ({info.duration} s)")
    return span


def _encode_frames(raw: bytes, num_frames: int, frame_size: int, quality: int, path: str) -> list[bytes]:
    frame_bytes = frame_size * frame_size * 3
    count = min(len(raw) // frame_bytes, num_frames)
    if count == 0:
        raise MediaError(NO_VIDEO, f"{path!r}: no video frame decoded in the requested interval")
    pixels = torch.frombuffer(bytearray(raw[: count * frame_bytes]), dtype=torch.uint8)
    images = list(pixels.view(count, frame_size, frame_size, 3).permute(0, 3, 1, 2).contiguous())
    encoded = [bytes(jpeg.numpy()) for jpeg in torchvision.io.encode_jpeg(images, quality=quality)]
    # The video stopped before the clip did: hold its last picture (never a blank stand-in).
    return encoded + [encoded[-1]] * (num_frames - count)
