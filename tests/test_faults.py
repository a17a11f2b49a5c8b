"""The fault matrix: every way a source can fail maps to exactly one outcome, final or transient.

Clips are served by the loopback server (tests/media_server.py) and, where the fault is in
the file itself, also given as local paths. One shard goes through the download, feature and
availability stages as the workflow runs them; the test asserts each clip's outcome, that
every clip has exactly one status row, and that the HDF5 shard holds exactly the `ok` clips.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from conftest import garbage_bytes, make_clip
from media_server import MediaServer, refused_url

from equiav.data import status as st
from equiav.data.availability import gather
from equiav.data.download import DownloadSettings, download_shard
from equiav.data.features import FeatureSettings, extract_shard
from equiav.data.store import read_index

# A YouTube-like segment: it starts later than the download margin, so the fetched file
# begins before the segment and the offset of the segment in it is the margin.
SOURCE_SECONDS = 8.0
SEGMENT = (3.0, 6.0)

# (clip id, how it is served, file, expected outcome). "http" goes through the loopback
# server (a fault path prefix may come first), "path" gives the file itself.
MATRIX: list[tuple[str, str, str, str]] = [
    ("ok-http", "http:", "good.mp4", st.OK),
    ("ok-path", "path", "good.mp4", st.OK),
    ("http-404", "http:status404", "good.mp4", st.UNAVAILABLE),
    ("http-410", "http:status410", "good.mp4", st.UNAVAILABLE),
    ("http-403", "http:status403", "good.mp4", st.UNAVAILABLE),
    ("http-429", "http:status429", "good.mp4", st.RATE_LIMITED),
    ("http-500", "http:status500", "good.mp4", st.OTHER),
    ("http-503", "http:status503", "good.mp4", st.OTHER),
    ("refused", "refused", "good.mp4", st.OTHER),
    ("dropped", "http:drop", "good.mp4", st.OTHER),
    ("html-page", "http:html", "good.mp4", st.UNAVAILABLE),
    ("truncated-tail-http", "http:", "truncated_tail.mp4", st.DECODE_ERROR),
    ("truncated-tail-path", "path", "truncated_tail.mp4", st.DECODE_ERROR),
    ("truncated-fast-http", "http:", "truncated_fast.mp4", st.DECODE_ERROR),
    ("truncated-fast-path", "path", "truncated_fast.mp4", st.DECODE_ERROR),
    ("random-http", "http:", "random.mp4", st.DECODE_ERROR),
    ("random-path", "path", "random.mp4", st.DECODE_ERROR),
    ("no-audio", "http:", "noaudio.mp4", st.NO_AUDIO),
    ("no-video", "http:", "novideo.mp4", st.NO_VIDEO),
    ("short-audio-http", "http:", "short_audio.mp4", st.TOO_SHORT),
    ("short-audio-path", "path", "short_audio.mp4", st.TOO_SHORT),
    ("short-video-http", "http:", "short_video.mp4", st.TOO_SHORT),
    ("short-video-path", "path", "short_video.mp4", st.TOO_SHORT),
    ("silent-http", "http:", "silent.mp4", st.SILENT),
    ("silent-path", "path", "silent.mp4", st.SILENT),
    ("tiny-http", "http:", "tiny.mp4", st.TOO_SHORT),
    ("tiny-path", "path", "tiny.mp4", st.TOO_SHORT),
]


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("faults")
    make_clip(root / "good.mp4", SOURCE_SECONDS)
    whole = make_clip(root / "whole.mp4", SOURCE_SECONDS, faststart=False).read_bytes()
    (root / "truncated_tail.mp4").write_bytes(whole[: len(whole) // 2])  # the index (moov) was at the end
    fast = make_clip(root / "fast.mp4", SOURCE_SECONDS, faststart=True).read_bytes()
    (root / "truncated_fast.mp4").write_bytes(fast[: len(fast) // 2])  # index first, media cut off
    (root / "random.mp4").write_bytes(garbage_bytes(200_000))
    make_clip(root / "noaudio.mp4", SOURCE_SECONDS, with_audio=False)
    make_clip(root / "novideo.mp4", SOURCE_SECONDS, with_video=False)
    # Audio covers 1.5 s of the 3 s segment while the video covers all of it, and the reverse.
    make_clip(root / "short_audio.mp4", SEGMENT[0] + 1.5, video_seconds=SOURCE_SECONDS)
    make_clip(root / "short_video.mp4", SOURCE_SECONDS, video_seconds=SEGMENT[0] + 1.5)
    make_clip(root / "silent.mp4", SOURCE_SECONDS, audio_expr="0")
    make_clip(root / "tiny.mp4", 0.5)
    return root


def _source(how: str, file: str, served: Path, server: MediaServer) -> str:
    if how == "path":
        return str(served / file)
    if how == "refused":
        return refused_url(file)
    fault = how.removeprefix("http:")
    return f"{server.url}/{fault}/{file}" if fault else f"{server.url}/{file}"


def test_the_fault_matrix(served, tmp_path):
    settings = DownloadSettings(retries=1, backoff_seconds=0.01, workers=2, socket_timeout=10)
    features = FeatureSettings(target_frames=304, num_frames=3, frame_size=32)
    with MediaServer(served) as server:
        clips = pd.DataFrame(
            [
                {"clip_id": cid, "source": _source(how, file, served, server), "start": SEGMENT[0],
                 "end": SEGMENT[1], "labels": "a", "split": "train"}
                for cid, how, file, _ in MATRIX
            ]
        )  # fmt: skip
        shard = tmp_path / "shard.csv"
        clips.to_csv(shard, index=False)
        clips.to_csv(tmp_path / "manifest.csv", index=False)
        downloads = download_shard(shard, tmp_path / "media", tmp_path / "download.csv", settings)
    extracted = extract_shard(downloads, tmp_path / "shard.h5", features, workers=2)
    extracted.to_csv(tmp_path / "features.csv", index=False)
    status, usable = gather(
        tmp_path / "manifest.csv", [tmp_path / "download.csv"], [tmp_path / "features.csv"], [tmp_path / "shard.h5"]
    )

    assert status["clip_id"].tolist() == clips["clip_id"].tolist()  # exactly one row per clip
    got = status.set_index("clip_id")
    expected = {cid: outcome for cid, _, _, outcome in MATRIX}
    wrong = {
        cid: (got.loc[cid, "status"], got.loc[cid, "detail"][:160])
        for cid in expected
        if got.loc[cid, "status"] != expected[cid]
    }
    assert not wrong, f"outcomes differ from the matrix: {wrong}"
    for cid, outcome in expected.items():
        assert got.loc[cid, "final"] == (outcome in st.FINAL), cid
    # The HDF5 shard holds exactly the ok clips.
    assert sorted(read_index([tmp_path / "shard.h5"])["clip_id"]) == sorted(
        c for c, o in expected.items() if o == st.OK
    )
    assert sorted(usable["clip_id"]) == ["ok-http", "ok-path"]
