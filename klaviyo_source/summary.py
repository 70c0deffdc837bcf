"""What a run reports back: members per segment as loaded, and the segments that failed."""

import unicodedata
from typing import Dict

from dlt.common.pipeline import SupportsPipeline

from . import settings
from .views import Qualify, appends_versions, table_reader


def _members_per_segment(table: Qualify) -> str:
    return f"""
SELECT s.id, s.name, SUM(CASE WHEN m.is_member THEN 1 ELSE 0 END) AS members
FROM {table(settings.SEGMENTS_TABLE)} AS s
LEFT JOIN {table(settings.MEMBERSHIPS_TABLE)} AS m ON m.segment_id = s.id
WHERE s.deleted_at IS NULL
GROUP BY s.id, s.name
ORDER BY members DESC, s.name
"""


def _segments_without_members(table: Qualify) -> str:
    return f"""
SELECT s.id, s.name, 0 AS members
FROM {table(settings.SEGMENTS_TABLE)} AS s
WHERE s.deleted_at IS NULL
ORDER BY s.name
"""


def failed_segments(pipeline: SupportsPipeline) -> Dict[str, str]:
    """Segments whose walk failed in the last run, with the reason; empty when all worked."""
    source_state = pipeline.state.get("sources", {}).get("klaviyo", {})
    return dict(source_state.get(settings.FAILURES_STATE_KEY) or {})


def membership_summary(pipeline: SupportsPipeline) -> str:
    """A short table of current members per live segment, read from the destination.

    On a destination that keeps every version of a merged row (the filesystem destination),
    only each key's newest version counts.
    """
    dataset = pipeline.dataset()  # type: ignore[attr-defined]
    if settings.SEGMENTS_TABLE not in dataset.tables:
        return "No segments loaded."
    table = table_reader(lambda name: name, newest_only=appends_versions(pipeline))
    if settings.MEMBERSHIPS_TABLE not in dataset.tables:
        query = _segments_without_members(table)
    else:
        query = _members_per_segment(table)
    rows = dataset(query).fetchall()
    width = max([display_width(str(name)) for _, name, _ in rows] + [len("segment")])
    lines = [f"{'segment':<{width}}  {'id':<8}  members", "-" * (width + 19)]
    lines += [
        f"{padded(str(name), width)}  {segment_id:<8}  {int(members or 0):>7}"
        for segment_id, name, members in rows
    ]
    total = sum(int(members or 0) for _, _, members in rows)
    lines.append(f"{len(rows)} segments, {total} memberships")
    return "\n".join(lines)


def display_width(text: str) -> int:
    """Columns `text` takes in a terminal: wide (CJK, most emoji) characters take two,
    combining marks none."""
    return sum(
        0 if unicodedata.combining(char) else 2 if unicodedata.east_asian_width(char) in "WF" else 1
        for char in text
    )


def padded(text: str, width: int) -> str:
    """`text` padded with spaces to `width` terminal columns."""
    return text + " " * max(0, width - display_width(text))
