"""The fixed vocabulary of per-clip outcomes shared by the download and feature stages, and
the mapping of failure messages (yt-dlp's and ffmpeg's) onto it.

Every clip of a run ends with exactly one of these. ``FINAL`` outcomes are never retried;
the others (transient) are retried with back-off inside a job, and again when the user asks
for it (``equiav transient``, docs/data.md).
"""

from __future__ import annotations

import re

OK = "ok"
UNAVAILABLE = "unavailable"  # removed, never existed, 404
PRIVATE = "private"
GEO_BLOCKED = "geo-blocked"
SIGN_IN = "sign-in"  # sign-in, age gate or bot check: may succeed later or with cookies
RATE_LIMITED = "rate-limited"  # HTTP 429 and YouTube's throttling messages
TOO_SHORT = "too-short"  # the audio or the video covers less of the segment than the config allows
NO_AUDIO = "no-audio"
NO_VIDEO = "no-video"
SILENT = "silent"  # no audio sample reaches features.SILENCE_PEAK: nothing to learn from
DECODE_ERROR = "decode-error"  # truncated or corrupt media
OTHER = "other"  # anything unrecognised (network errors and server outages included)

VOCABULARY = (
    OK,
    UNAVAILABLE,
    PRIVATE,
    GEO_BLOCKED,
    SIGN_IN,
    RATE_LIMITED,
    TOO_SHORT,
    NO_AUDIO,
    NO_VIDEO,
    SILENT,
    DECODE_ERROR,
    OTHER,
)

# Outcomes a later attempt cannot change: a re-run skips these clips.
FINAL = frozenset({OK, UNAVAILABLE, PRIVATE, GEO_BLOCKED, TOO_SHORT, NO_AUDIO, NO_VIDEO, SILENT, DECODE_ERROR})
# Outcomes worth retrying inside the same job, with exponential back-off.
RETRY_IN_JOB = frozenset({RATE_LIMITED, OTHER})
# Answers about the address rather than the clip: many in a row mean the host is blocked.
BLOCKED = frozenset({SIGN_IN, RATE_LIMITED})

# Failure messages -> outcomes. The first match wins, so the specific ones come first.
# Network faults are named explicitly so that they stay transient even where an unknown
# message would mean damaged media (ffmpeg failing to read a file).
_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (status, re.compile(pattern, re.IGNORECASE))
    for status, pattern in (
        (RATE_LIMITED, r"HTTP Error 429|Too Many Requests|rate.?limit|try again later"),
        (SIGN_IN, r"Sign in to confirm|confirm your age|age.restricted|login required|cookies .*authenticat|not a bot"),
        (PRIVATE, r"private video|video is private"),
        (GEO_BLOCKED, r"not (made this video )?available in your country|geo.?restrict|blocked it in your country"),
        (
            OTHER,
            r"HTTP Error 5\d\d|Server returned 5(\d\d|XX)|Internal Server Error|Service Unavailable|Bad Gateway|"
            r"Gateway Time.?out|Server returned 4XX|Connection (refused|reset|timed out|aborted)|timed out|"
            r"Network is unreachable|No route to host|Temporary failure in name resolution|"
            r"Name or service not known|Stream ends prematurely|IncompleteRead|Remote end closed|Broken pipe",
        ),
        (
            UNAVAILABLE,
            r"HTTP Error 40[0134]|HTTP Error 410|Server returned 40[0134]|Video unavailable|has been removed|"
            r"no longer available|account .*terminated|does not exist|404 Not Found|Unsupported URL|"
            r"Incomplete YouTube ID|This video is unavailable|members-only|premieres in|No such file or directory",
        ),
        (DECODE_ERROR, r"Invalid data found|moov atom not found|Output file is empty"),
    )
)


def classify_error(message: str, default: str = OTHER) -> str:
    """The outcome a failure message stands for; ``default`` when no pattern knows it."""
    for status, pattern in _PATTERNS:
        if pattern.search(message):
            return status
    return default
