"""Klaviyo's `profile_count` of the segments a run counts, asked in a thread of their own.

`GET /segments/{id}?additional-fields[segment]=profile_count` is on the XS tier: 1/s, 15/min.
Asked by the segment walks, a count would hold an extract worker for up to 4 s each while the
walks' own quotas sat idle. The counts are therefore asked one after the other from the moment
the run's plan is made, while the walks run; a counted segment's walk takes its count after its
incremental pass. The thread uses only the client, which is shared by every thread.

A count taken before the pass is compared with the members held plus the joins the pass loaded
that are dated before the count was answered: a join dated later is not in it.
"""

import threading
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Dict, Mapping, Optional, Sequence

from .client import KlaviyoClient
from .errors import KlaviyoAuthenticationError, KlaviyoPermissionError

# Joins dated up to this long after a count was answered are still taken as counted in it:
# Klaviyo's clock and ours may differ a little. Counting too many joins only ever calls for a
# walk that finds nothing; too few could let a join hide a leave.
COUNT_CLOCK_MARGIN = timedelta(minutes=1)


@dataclass(frozen=True)
class ProfileCount:
    """Klaviyo's `profile_count` of a segment, and when it was answered."""

    value: Optional[int]
    answered_at: datetime


def count_differs(count: ProfileCount, held_count: int, join_times: Sequence[datetime]) -> bool:
    """Whether a count disagrees with the members held plus the joins it can have seen.

    A join dated before the count but not yet visible to it only calls for a walk that finds
    nothing. What a count cannot tell is a leave and a join the pass did not see (a late one):
    they cancel out.
    """
    if count.value is None:
        return False  # Klaviyo gave no figure: leaves wait for the scheduled full walk
    counted_until = count.answered_at + COUNT_CLOCK_MARGIN
    joined = sum(1 for joined_at in join_times if joined_at <= counted_until)
    return count.value != held_count + joined


def count_in_background(
    client: KlaviyoClient, segment_ids: Sequence[str]
) -> Dict[str, "Future[ProfileCount]"]:
    """Ask each segment's `profile_count`, in order, in a thread of its own; a future each.

    A request that fails leaves its error in its future, for that segment's walk to raise.
    Authentication and permission errors would fail every count alike: they end the thread.
    """
    futures: Dict[str, Future[ProfileCount]] = {sid: Future() for sid in segment_ids}
    if futures:
        threading.Thread(
            target=_count_each,
            args=(client, futures),
            name="klaviyo-profile-counts",
            daemon=True,
        ).start()
    return futures


def _count_each(client: KlaviyoClient, futures: Mapping[str, "Future[ProfileCount]"]) -> None:
    pending = list(futures.items())
    for position, (segment_id, future) in enumerate(pending):
        try:
            document = client.get_segment(segment_id, additional_fields_segment=["profile_count"])
        except (KlaviyoAuthenticationError, KlaviyoPermissionError) as error:
            for _, unanswered in pending[position:]:
                unanswered.set_exception(error)
            return
        except Exception as error:  # the segment's walk raises it, and fails as it would have
            future.set_exception(error)
            continue
        future.set_result(ProfileCount(_profile_count(document), datetime.now(timezone.utc)))


def _profile_count(document: Mapping[str, object]) -> Optional[int]:
    data = document.get("data")
    attributes = data.get("attributes") if isinstance(data, dict) else None
    value = attributes.get("profile_count") if isinstance(attributes, dict) else None
    return value if isinstance(value, int) else None
