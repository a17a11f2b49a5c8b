"""The fixed vocabulary of per-clip outcomes shared by the download and feature stages.

Every clip of a run ends with exactly one of these. ``FINAL`` outcomes are never retried
by a re-run; the others (transient) are retried with back-off inside a job and again on
the next run of the workflow.
"""

from __future__ import annotations

OK = "ok"
UNAVAILABLE = "unavailable"  # removed, never existed, 404
PRIVATE = "private"
GEO_BLOCKED = "geo-blocked"
SIGN_IN = "sign-in"  # sign-in, age gate or bot check: may succeed later or with cookies
RATE_LIMITED = "rate-limited"  # HTTP 429 and YouTube's throttling messages
TOO_SHORT = "too-short"  # the media covers less of the segment than the config allows
NO_AUDIO = "no-audio"
NO_VIDEO = "no-video"
DECODE_ERROR = "decode-error"  # truncated or corrupt media
OTHER = "other"  # anything unrecognised (network errors included)

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
    DECODE_ERROR,
    OTHER,
)

# Outcomes a later attempt cannot change: a re-run skips these clips.
FINAL = frozenset({OK, UNAVAILABLE, PRIVATE, GEO_BLOCKED, TOO_SHORT, NO_AUDIO, NO_VIDEO, DECODE_ERROR})
# Outcomes worth retrying inside the same job, with exponential back-off.
RETRY_IN_JOB = frozenset({RATE_LIMITED, OTHER})


def is_final(status: str) -> bool:
    if status not in VOCABULARY:
        raise ValueError(f"unknown clip status {status!r}; expected one of {', '.join(VOCABULARY)}")
    return status in FINAL
