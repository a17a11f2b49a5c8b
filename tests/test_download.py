"""The shard downloader against a loopback HTTP server and local files (no internet)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import wave
from pathlib import Path

import pandas as pd
import pytest
from conftest import make_clip
from media_server import MediaServer

from equiav.data import status as st
from equiav.data.download import DownloadSettings, FetchError, ShardDownloader, download_shard, source_kind
from equiav.data.media import check_media
from equiav.data.status import classify_error

SEGMENT = (1.0, 4.0)


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Path:
    """The files the server offers: good clips, one without sound, a short one, a truncated one."""
    root = tmp_path_factory.mktemp("served")
    for name in ("good", "good2", "good3", "good4", "good5", "good6"):
        make_clip(root / f"{name}.mp4", seconds=6.0)
    make_clip(root / "noaudio.mp4", seconds=6.0, with_audio=False)
    make_clip(root / "short.mp4", seconds=2.0)
    # A WAV header with no samples, as some files of real audio collections are.
    with wave.open(str(root / "empty.wav"), "wb") as empty:
        empty.setnchannels(2)
        empty.setsampwidth(2)
        empty.setframerate(44100)
    # moov atom at the end, as in a file whose upload or copy broke off: the head has no index.
    whole = make_clip(root / "whole.mp4", seconds=6.0, faststart=False).read_bytes()
    (root / "truncated.mp4").write_bytes(whole[: len(whole) // 2])
    return root


def _clips(rows: list[tuple[str, str]]) -> pd.DataFrame:
    return pd.DataFrame(
        [
            {"clip_id": cid, "source": src, "start": SEGMENT[0], "end": SEGMENT[1], "labels": "a", "split": "train"}
            for cid, src in rows
        ]
    )


def _fast(**overrides) -> DownloadSettings:
    settings = {"retries": 2, "backoff_seconds": 0.01, "workers": 2, "socket_timeout": 10, "youtube_per_hour": None}
    return DownloadSettings(**{**settings, **overrides})


def test_every_clip_gets_the_right_status(served, tmp_path):
    with MediaServer(served) as server:
        clips = _clips(
            [
                ("good", f"{server.url}/good.mp4"),
                ("missing", f"{server.url}/missing/good.mp4"),
                ("flaky", f"{server.url}/flaky1/good2.mp4"),
                ("truncated", f"{server.url}/truncated.mp4"),
                ("noaudio", f"{server.url}/noaudio.mp4"),
                ("short", f"{server.url}/short.mp4"),
                ("local", str(served / "good3.mp4")),
                ("local-missing", str(served / "nope.mp4")),
                ("file-url", (served / "good4.mp4").as_uri()),
                ("file-url-missing", (served / "gone.mp4").as_uri()),
            ]
        )
        shard = tmp_path / "shard.csv"
        clips.to_csv(shard, index=False)
        rows = download_shard(shard, tmp_path / "media", tmp_path / "status.csv", _fast())
        flaky_hits = server.hits("/flaky1/good2.mp4")

    by_id = rows.set_index("clip_id")
    assert list(rows["clip_id"]) == list(clips["clip_id"])  # every clip exactly once, in order
    expected = {
        "good": st.OK,
        "missing": st.UNAVAILABLE,
        "flaky": st.OK,
        "truncated": st.DECODE_ERROR,
        "noaudio": st.NO_AUDIO,
        "short": st.TOO_SHORT,
        "local": st.OK,
        "local-missing": st.UNAVAILABLE,
        "file-url": st.OK,
        "file-url-missing": st.UNAVAILABLE,
    }
    assert by_id["status"].to_dict() == expected
    assert by_id.loc["flaky", "attempts"] == 2 and flaky_hits >= 2  # the 429 was retried, then it worked
    assert by_id.loc["missing", "attempts"] == 1  # a 404 is final: no retry
    assert "429" not in by_id.loc["flaky", "detail"]
    # The written file agrees with the returned rows.
    assert pd.read_csv(tmp_path / "status.csv")["status"].tolist() == rows["status"].tolist()

    for cid in ("good", "flaky", "file-url"):
        file = by_id.loc[cid, "file"]
        assert Path(file).parent == tmp_path / "media"
        info, present = check_media(file)
        assert info.has_audio and info.has_video
        # The segment (3 s) plus the margin on each side, within a keyframe's slack.
        assert min(present.values()) >= SEGMENT[1] - SEGMENT[0]
    assert by_id.loc["good", "offset"] == pytest.approx(1.0)  # start - (start - margin)
    assert by_id.loc["local", "file"] == str(served / "good3.mp4")  # local files are used in place
    assert by_id.loc["local", "offset"] == SEGMENT[0]
    # Failed clips leave nothing behind under a final name, nor any partial file.
    assert sorted(p.stem for p in (tmp_path / "media").iterdir()) == ["file-url", "flaky", "good", "journal"]


def test_rerun_skips_final_clips_and_retries_transient_ones(served, tmp_path):
    with MediaServer(served) as server:
        clips = _clips([("good", f"{server.url}/good.mp4"), ("limited", f"{server.url}/flaky99/good5.mp4")])
        downloader = ShardDownloader(tmp_path / "media", _fast(retries=1))
        first = downloader.run(clips).set_index("clip_id")
        assert first.loc["limited", "status"] == st.RATE_LIMITED
        assert not first.loc["limited", "final"] and first.loc["good", "final"]
        hits_good = server.hits("/good.mp4")
        hits_limited = server.hits("/flaky99/good5.mp4")

        second = ShardDownloader(tmp_path / "media", _fast(retries=0)).run(clips).set_index("clip_id")
        assert server.hits("/good.mp4") == hits_good  # final: not fetched again
        assert server.hits("/flaky99/good5.mp4") > hits_limited  # transient: tried again
        assert second.loc["good", "updated"] == first.loc["good", "updated"]

        # A final `ok` whose file was deleted is fetched again.
        os.remove(second.loc["good", "file"])
        third = ShardDownloader(tmp_path / "media", _fast(retries=0)).run(clips).set_index("clip_id")
        assert server.hits("/good.mp4") > hits_good
        assert third.loc["good", "status"] == st.OK and os.path.exists(third.loc["good", "file"])


def test_killed_job_resumes_without_redoing_or_using_partial_files(served, tmp_path):
    """SIGKILL the shard job mid-way; the re-run fetches only the unfinished clips."""
    names = ["good", "good2", "good3", "good4", "good5", "good6"]
    with MediaServer(served, delay=0.4) as server:
        clips = _clips([(n, f"{server.url}/slow/{n}.mp4") for n in names])
        shard, media, out = tmp_path / "shard.csv", tmp_path / "media", tmp_path / "status.csv"
        clips.to_csv(shard, index=False)
        settings = '{"download": {"workers": 1, "retries": 0}, "modalities": ["audio", "video"]}'
        cmd = [sys.executable, "-m", "equiav", "download", "--settings", settings]
        cmd += ["--shard", str(shard), "--media-dir", str(media), "--out", str(out)]
        job = subprocess.Popen(cmd, stderr=subprocess.DEVNULL)
        journal = media / "journal.csv"
        deadline = time.time() + 120
        while time.time() < deadline:
            if journal.exists() and len(journal.read_text().splitlines()) >= 3:  # header + 2 clips
                break
            time.sleep(0.05)
        time.sleep(0.3)  # let the third clip get under way
        job.send_signal(signal.SIGKILL)
        job.wait()
        assert not out.exists()  # the status file appears only when the shard is complete
        done_before = {line.split(",")[0] for line in journal.read_text().splitlines()[1:]}
        assert 2 <= len(done_before) < len(names)
        hits_before = {n: server.hits(f"/slow/{n}.mp4") for n in names}

        subprocess.run(cmd, check=True, stderr=subprocess.DEVNULL)
        hits_after = {n: server.hits(f"/slow/{n}.mp4") for n in names}

    for name in names:
        if name in done_before:
            assert hits_after[name] == hits_before[name], f"{name} was fetched again"
        else:
            assert hits_after[name] > hits_before[name]
    rows = pd.read_csv(out)
    assert rows["status"].tolist() == [st.OK] * len(names)
    assert not (media / ".partial").exists()
    for file in rows["file"]:
        check_media(file)  # complete and readable, not a partial download


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        ("[youtube] abc: Video unavailable. This video has been removed by the uploader", st.UNAVAILABLE),
        ("[youtube] abc: Private video. Sign in if you've been granted access to this video", st.PRIVATE),
        ("[youtube] abc: Sign in to confirm you're not a bot. Use --cookies-from-browser", st.SIGN_IN),
        ("[youtube] abc: Sign in to confirm your age. This video may be inappropriate for some users.", st.SIGN_IN),
        ("[youtube] abc: The uploader has not made this video available in your country", st.GEO_BLOCKED),
        ("Unable to download webpage: HTTP Error 429: Too Many Requests", st.RATE_LIMITED),
        ("Unable to download webpage: HTTP Error 404: Not Found", st.UNAVAILABLE),
        ("Unable to download webpage: <urlopen error [Errno 111] Connection refused>", st.OTHER),
        ("ffmpeg exited with code 1", st.OTHER),
        ("[generic] a: Unable to download webpage: [Errno 2] No such file or directory: '/x/a.mp4'", st.UNAVAILABLE),
    ],
)
def test_classify_yt_dlp_messages(message, expected):
    assert classify_error(message) == expected


def test_source_kinds(tmp_path):
    assert source_kind("dQw4w9WgXcQ") == "youtube"
    assert source_kind("https://example.org/a.mp4") == "url"
    assert source_kind("file:///tmp/a.mp4") == "file"
    assert source_kind(str(tmp_path / "a.mp4")) == "path"
    with pytest.raises(ValueError, match="unsupported source"):
        source_kind("s3://bucket/a.mp4")


def test_an_empty_audio_file_is_too_short(served, tmp_path):
    clips = _clips([("empty", str(served / "empty.wav")), ("fine", str(served / "good.mp4"))]).assign(end=float("nan"))
    rows = ShardDownloader(tmp_path, _fast(need_video=False)).run(clips).set_index("clip_id")
    assert rows.loc["empty", "status"] == st.TOO_SHORT and "no samples" in rows.loc["empty", "detail"]
    assert rows.loc["fine", "status"] == st.OK


def test_missing_cookies_file_fails_the_job_not_the_clips(tmp_path):
    with pytest.raises(FileNotFoundError, match="download.cookies"):
        ShardDownloader(tmp_path, _fast(cookies=str(tmp_path / "cookies.txt"))).run(_clips([("a", "x.mp4")]))


def test_cookies_are_used_through_a_private_copy(served, tmp_path):
    cookies = tmp_path / "cookies.txt"
    text = "# Netscape HTTP Cookie File\n127.0.0.1\tFALSE\t/\tFALSE\t0\tsession\tabc\n"
    cookies.write_text(text)
    with MediaServer(served) as server:
        rows = ShardDownloader(tmp_path / "media", _fast(cookies=str(cookies))).run(
            _clips([("good", f"{server.url}/good.mp4")])
        )
    assert rows["status"].tolist() == [st.OK]
    assert cookies.read_text() == text  # yt-dlp rewrote only its copy


# --- behaviours a user meets on real sources ---------------------------------------------


def test_a_segment_that_starts_after_the_margin_is_cut_at_the_right_offset(tmp_path, frame_number):
    """Nearly every YouTube segment starts well into its video: the fetched file begins
    `margin` seconds before the segment, and the recorded offset finds the segment in it,
    even between keyframes (one every 2 s here)."""
    from equiav.data.media import decode_clip

    numbered = make_clip(tmp_path / "numbered.mp4", 10.0, fps=25, size=(128, 128), numbered=True)
    gop = tmp_path / "served"
    gop.mkdir()
    # Re-encode with a keyframe every 50 frames, so that the cut cannot fall on one by luck.
    from equiav.data.media import ffmpeg_exe

    subprocess.run(
        [ffmpeg_exe(), "-v", "error", "-i", str(numbered), "-c:v", "libx264", "-preset", "ultrafast", "-crf", "12",
         "-g", "50", "-c:a", "copy", str(gop / "numbered.mp4")],
        check=True,
    )  # fmt: skip
    start = 3.32  # frame 83 at 25 fps, between the keyframes at 2 s and 4 s
    with MediaServer(gop) as server:
        clips = _clips([("late", f"{server.url}/numbered.mp4")]).assign(start=start, end=start + 2.0)
        row = ShardDownloader(tmp_path / "media", _fast(margin=1.0)).run(clips).iloc[0]
    assert row["status"] == st.OK
    assert row["offset"] == pytest.approx(1.0)
    decoded = decode_clip(row["file"], row["offset"], 2.0, num_frames=10, frame_size=128)
    # Frame k is the source's frame at start + 0.2 k seconds: 83, 88, 93, ... at 25 fps.
    assert [frame_number(f) for f in decoded.frames] == [83 + 5 * k for k in range(10)]


def test_a_server_error_then_success_in_the_same_job(served, tmp_path):
    with MediaServer(served) as server:
        rows = ShardDownloader(tmp_path / "media", _fast()).run(_clips([("c", f"{server.url}/fail500x1/good.mp4")]))
    assert rows["status"].tolist() == [st.OK] and rows["attempts"].tolist() == [2]


@pytest.mark.parametrize("retries", [0, 2])
def test_a_transient_failure_is_attempted_retries_plus_one_times(served, tmp_path, retries):
    pauses: list[float] = []
    with MediaServer(served) as server:
        downloader = ShardDownloader(
            tmp_path / "media", _fast(retries=retries, backoff_seconds=1.0), sleep=pauses.append
        )
        rows = downloader.run(_clips([("c", f"{server.url}/status503/good.mp4")]))
    assert rows["status"].tolist() == [st.OTHER] and not rows["final"].iloc[0]
    assert rows["attempts"].tolist() == [retries + 1]
    # Exponential back-off with +-20 % jitter between the attempts.
    assert len(pauses) == retries
    for i, pause in enumerate(pauses):
        assert 0.8 * 2**i <= pause <= 1.2 * 2**i


YOUTUBE_IDS = [f"yt{i:09d}" for i in range(12)]  # 11 characters: YouTube ids, never fetched here


def _youtube_clips(ids: list[str]) -> pd.DataFrame:
    return pd.DataFrame(
        [
            {"clip_id": f"{i}_000001", "source": i, "start": 1.0, "end": 4.0, "labels": "a", "split": "train"}
            for i in ids
        ]
    )


@pytest.fixture
def youtube(monkeypatch, tmp_path, served):
    """YouTube as a fake: each id answers with the outcome in `answers` (default: a good clip).
    The block marker lives under a private cache folder."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    answers: dict[str, str] = {}
    asked: list[str] = []

    def fake_fetch(self, clip, kind, start, end, tmp, youtube_url):
        assert kind == "youtube"
        asked.append(clip["source"])
        outcome = answers.get(clip["source"], st.OK)
        if outcome == st.SIGN_IN:
            raise FetchError(st.SIGN_IN, "[youtube] x: Sign in to confirm you're not a bot")
        if outcome == st.RATE_LIMITED:
            raise FetchError(st.RATE_LIMITED, "HTTP Error 429: Too Many Requests")
        copy = tmp / "clip.mp4"
        copy.write_bytes((served / "good.mp4").read_bytes())
        return copy, start

    monkeypatch.setattr(ShardDownloader, "_fetch", fake_fetch)
    return answers, asked


def test_sign_in_stays_transient_and_is_asked_again(youtube, tmp_path):
    answers, asked = youtube
    answers[YOUTUBE_IDS[0]] = st.SIGN_IN
    clips = _youtube_clips(YOUTUBE_IDS[:2])
    rows = ShardDownloader(tmp_path / "media", _fast()).run(clips).set_index("source")
    assert rows.loc[YOUTUBE_IDS[0], "status"] == st.SIGN_IN and not rows.loc[YOUTUBE_IDS[0], "final"]
    assert rows.loc[YOUTUBE_IDS[0], "attempts"] == 1  # not retried in the job: asking again at once does not help
    del answers[YOUTUBE_IDS[0]]
    asked.clear()
    rows = ShardDownloader(tmp_path / "media", _fast()).run(clips).set_index("source")
    assert asked == [YOUTUBE_IDS[0]]  # the final clip is skipped, the transient one asked again
    assert rows["status"].tolist() == [st.OK, st.OK]


@pytest.mark.parametrize("answer", [st.SIGN_IN, st.RATE_LIMITED])
def test_a_bot_check_streak_stops_the_asking(youtube, tmp_path, caplog, answer):
    answers, asked = youtube
    ok_first = YOUTUBE_IDS[:2]
    for i in YOUTUBE_IDS[2:]:
        answers[i] = answer
    # One good clip inside the streak starts the count again.
    answers[YOUTUBE_IDS[4]] = st.OK
    settings = _fast(workers=1, retries=0, block_after=3)
    with caplog.at_level("ERROR"):
        rows = ShardDownloader(tmp_path / "media", settings).run(_youtube_clips(YOUTUBE_IDS)).set_index("source")
    # good, good, blocked, blocked, good, blocked x3 -> stop; the 4 after it are never asked.
    assert asked == YOUTUBE_IDS[:8]
    assert (rows.loc[ok_first + [YOUTUBE_IDS[4]], "status"] == st.OK).all()
    untried = rows.loc[YOUTUBE_IDS[8:]]
    assert (untried["status"] == answer).all() and (untried["attempts"] == 0).all() and not untried["final"].any()
    assert untried["detail"].str.startswith("not tried").all()
    assert len(rows) == len(YOUTUBE_IDS)  # every clip has its one row
    advice = " ".join(r.getMessage() for r in caplog.records if r.levelname == "ERROR")
    assert "YouTube is refusing this host" in advice and "4 clip(s)" in advice
    for hint in ("download.cookies", "sleep_seconds", "--forcerun", "equiav transient"):
        assert hint in advice

    # The next job on this host does not ask YouTube while the block is fresh...
    asked.clear()
    rows = ShardDownloader(tmp_path / "other", settings).run(_youtube_clips(YOUTUBE_IDS[:3])).set_index("source")
    assert asked == [] and (rows["status"] == answer).all() and (rows["attempts"] == 0).all()
    # ...and asks again once the pause is over (here: no pause).
    answers.clear()
    rows = ShardDownloader(tmp_path / "other", _fast(block_after=3, block_pause_minutes=0)).run(
        _youtube_clips(YOUTUBE_IDS[:3])
    )
    assert rows["status"].tolist() == [st.OK] * 3


def test_block_after_zero_never_stops(youtube, tmp_path):
    answers, asked = youtube
    for i in YOUTUBE_IDS[:6]:
        answers[i] = st.SIGN_IN
    ShardDownloader(tmp_path / "media", _fast(workers=1, block_after=0)).run(_youtube_clips(YOUTUBE_IDS[:6]))
    assert asked == YOUTUBE_IDS[:6]


@pytest.mark.parametrize("clip_id", ["..", ".", ".hidden", "a/b"])
def test_an_unsafe_clip_id_stops_the_shard_before_anything_is_touched(served, tmp_path, clip_id):
    """A hostile id in a hand-edited shard: the job fails with the reason and deletes nothing."""
    media = tmp_path / "media"
    media.mkdir()
    (media / "journal.csv").write_text("kept\n")
    (media / ".partial").mkdir()
    (media / ".partial" / "x").write_text("kept\n")
    clips = _clips([("fine", str(served / "good.mp4")), (clip_id, str(served / "good2.mp4"))])
    with pytest.raises(ValueError, match="not safe file names.*rebuild the manifest"):
        ShardDownloader(media, _fast()).run(clips)
    assert (media / "journal.csv").read_text() == "kept\n" and (media / ".partial" / "x").exists()


def test_attempt_folders_are_the_downloaders_own(served, tmp_path, monkeypatch):
    """Attempts work in folders made for them, whatever the clip id says; only those are removed."""
    made: list[Path] = []
    real_fetch = ShardDownloader._fetch

    def spy(self, clip, kind, start, end, tmp, youtube_url):
        made.append(tmp)
        return real_fetch(self, clip, kind, start, end, tmp, youtube_url)

    monkeypatch.setattr(ShardDownloader, "_fetch", spy)
    media = tmp_path / "media"
    with MediaServer(served) as server:
        rows = ShardDownloader(media, _fast()).run(_clips([("partial", f"{server.url}/good.mp4")]))
    assert rows["status"].tolist() == [st.OK]
    assert len(made) == 1 and made[0].parent == media / ".partial" and made[0].name.startswith("attempt-")
    assert sorted(p.name for p in media.iterdir()) == ["journal.csv", "partial.mp4"]
