"""How a run looks for leaves: which segments it walks, which it counts, planned once per run.

Klaviyo never says when a profile leaves a segment. A run sees a leave by listing every current
member of the segment (a walk), or suspects one when Klaviyo's `profile_count` differs from the
members held plus the joins just loaded (a count). Each has its own quota:

- the incremental passes use `GET /segments/{id}/profiles` (L tier). A segment of at most one
  page is read whole by its pass for the same single request: an exact check at no cost;
- `GET /segments/{id}/relationships/profiles` (L tier, a quota of its own and otherwise idle)
  lists member ids, 100 a page. A walk is exact: every leave, and every join the incremental
  pass could not see, shows;
- `profile_count` (XS tier: 1/s, 15/min) costs one request whatever the segment's size, but a
  leave and a join the pass did not see cancel out.

A page costs 60/700 s of the walks' steady quota, a count 4 s of its own, so walking wins for
small segments and counting for large ones. The plan takes the split that ends soonest, the two
quotas working at once, and then walks as much as that time allows (a walk is exact): at least
what the walks' quota serves within its first steady window without waiting. What a count cannot
see (a leave cancelled out by a late join) and what no id walk can see (a re-join dated behind
the lookback window, an id that stays) is caught by each segment's scheduled full walk of
`/profiles`, which compares every `joined_group_at`.

Counts are asked in a thread of their own from the moment the plan is made, while the walks
run, so that no extract worker waits on the 1/s tier; a counted segment's walk picks its count up
after its pass. The plan is made in the pipeline's thread; the thread uses only the client.
"""

import enum
import logging
import math
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from . import settings
from .client import KlaviyoClient
from .errors import KlaviyoAuthenticationError, KlaviyoPermissionError

logger = logging.getLogger(__name__)

# Joins dated up to this long after a count was answered are still taken as counted in it:
# Klaviyo's clock and ours may differ a little. Counting too many joins only ever calls for a
# walk that finds nothing; too few could let a join hide a leave.
COUNT_CLOCK_MARGIN = timedelta(minutes=1)


class LeaveCheck(enum.Enum):
    """What a segment's walk does, beyond its incremental pass, to find leaves this run."""

    NONE = "none"  # the pass only: a first walk, a processing segment, reconcile="off"
    READ_WHOLE = "read whole"  # the pass lists every member on /profiles, joined_group_at too
    WALK_IDS = "walk ids"  # the pass, then every member id on /relationships/profiles
    COUNT = "count"  # the pass, then profile_count; an id walk if it differs


@dataclass(frozen=True)
class Quota:
    """A rate tier as this run may spend it: requests per second and per minute."""

    per_second: float
    per_minute: float

    @classmethod
    def of_tier(cls, tier: str, revision: str, share: float) -> "Quota":
        """The run's share of a published tier, at the limits `revision` documents."""
        per_second, per_minute = settings.RATE_TIERS[tier]
        if tier == "L" and revision[:10] < settings.L_TIER_STEADY_RAISED_IN:
            per_minute = settings.L_TIER_STEADY_BEFORE
        return cls(per_second * share, max(1.0, math.floor(per_minute * share)))

    def seconds_for(self, requests: int) -> float:
        """How long `requests` take when paced: bursts at the per-second rate, one steady
        window of requests a minute. The first is sent at once."""
        if requests <= 0:
            return 0.0
        minutes, within = divmod(requests - 1, int(self.per_minute))
        return minutes * 60.0 + within / self.per_second

    @property
    def window_seconds(self) -> float:
        """How long a whole steady window of requests takes: what is spent without waiting."""
        return self.seconds_for(int(self.per_minute))


@dataclass(frozen=True)
class LeavePolicy:
    """How leaves are looked for (`reconcile`), how often each segment is read whole, and the
    quotas a run's id walks and counts draw on."""

    reconcile: str = settings.DEFAULT_RECONCILE
    full_walk_every: Optional[timedelta] = settings.DEFAULT_FULL_RECONCILE_EVERY
    walk_quota: Quota = Quota.of_tier("L", settings.DEFAULT_REVISION, 1.0)
    count_quota: Quota = Quota.of_tier("XS", settings.DEFAULT_REVISION, 1.0)

    @classmethod
    def for_account(
        cls,
        reconcile: str,
        full_walk_every: Optional[timedelta],
        revision: str,
        share: float,
    ) -> "LeavePolicy":
        return cls(
            reconcile=reconcile,
            full_walk_every=full_walk_every,
            walk_quota=Quota.of_tier("L", revision, share),
            count_quota=Quota.of_tier("XS", revision, share),
        )


@dataclass(frozen=True)
class SegmentToCheck:
    """What the plan needs to know of one listed segment."""

    segment_id: str
    held_count: int
    walked_before: bool  # it has a cursor: its pass starts from there, not from the start
    is_processing: bool
    read_whole_at: Optional[datetime]  # its last full walk of /profiles

    @property
    def pages(self) -> int:
        """Pages a walk of its current members takes, as far as the run knows before it."""
        return max(1, math.ceil(self.held_count / settings.SEGMENT_PROFILES_PAGE_SIZE))


@dataclass(frozen=True)
class LeavePlan:
    """The check of each planned segment, and what the plan expects the checks to cost."""

    checks: Mapping[str, LeaveCheck] = field(default_factory=dict)
    # Counted segments, largest first: the order their counts are asked in.
    counted: Tuple[str, ...] = ()
    walked_pages: int = 0
    seconds: float = 0.0

    def check_of(self, segment_id: str) -> LeaveCheck:
        return self.checks.get(segment_id, LeaveCheck.NONE)

    def describe(self) -> str:
        tally = {kind: 0 for kind in LeaveCheck}
        for check in self.checks.values():
            tally[check] += 1
        return (
            f"leave checks: {tally[LeaveCheck.READ_WHOLE]} segments read whole, "
            f"{tally[LeaveCheck.WALK_IDS]} walked by id ({self.walked_pages} pages), "
            f"{tally[LeaveCheck.COUNT]} counted, {tally[LeaveCheck.NONE]} not checked; "
            f"about {self.seconds:.0f} s at the rate limits"
        )


def plan_leave_checks(
    segments: Sequence[SegmentToCheck], policy: LeavePolicy, now: datetime
) -> LeavePlan:
    """Each segment's check for this run (see the module's docstring)."""
    checks: Dict[str, LeaveCheck] = {}
    to_split: List[SegmentToCheck] = []
    for segment in segments:
        check = _check_before_the_split(segment, policy, now)
        if check is None:
            to_split.append(segment)
        else:
            checks[segment.segment_id] = check
    walked, counted, seconds = _split(to_split, policy.walk_quota, policy.count_quota)
    checks.update(dict.fromkeys((segment.segment_id for segment in walked), LeaveCheck.WALK_IDS))
    checks.update(dict.fromkeys((segment.segment_id for segment in counted), LeaveCheck.COUNT))
    return LeavePlan(
        checks=checks,
        counted=tuple(segment.segment_id for segment in reversed(counted)),
        walked_pages=sum(segment.pages for segment in walked),
        seconds=seconds,
    )


def _check_before_the_split(
    segment: SegmentToCheck, policy: LeavePolicy, now: datetime
) -> Optional[LeaveCheck]:
    """The check a segment gets whatever the others need; None if it is walked or counted."""
    if not segment.walked_before or segment.held_count == 0 or segment.is_processing:
        # A first pass lists every member anyway; a processing segment's membership is in flux.
        return LeaveCheck.NONE
    every = policy.full_walk_every
    due = every is not None and (
        segment.read_whole_at is None or now - segment.read_whole_at >= every
    )
    if due or policy.reconcile == "all":
        return LeaveCheck.READ_WHOLE
    if policy.reconcile != "counts":
        return LeaveCheck.NONE
    if segment.held_count <= settings.SEGMENT_PROFILES_PAGE_SIZE:
        return LeaveCheck.READ_WHOLE  # one page: the pass costs the same read whole
    return None


def _split(
    segments: Sequence[SegmentToCheck], walk_quota: Quota, count_quota: Quota
) -> Tuple[List[SegmentToCheck], List[SegmentToCheck], float]:
    """Walked (the smallest) and counted (the largest) segments, and the seconds they take.

    Walking the k smallest costs the fewest pages for k walks. The split ends when the slower
    quota is done; of the splits ending soonest (or within the walks' first steady window,
    which costs no waiting) the one walking most is taken, since a walk misses nothing.
    """
    ordered = sorted(segments, key=lambda segment: (segment.pages, segment.segment_id))
    pages_of_smallest = [0]
    for segment in ordered:
        pages_of_smallest.append(pages_of_smallest[-1] + segment.pages)

    def seconds(walked: int) -> float:
        return max(
            walk_quota.seconds_for(pages_of_smallest[walked]),
            count_quota.seconds_for(len(ordered) - walked),
        )

    soonest = min(seconds(walked) for walked in range(len(ordered) + 1))
    allowed = max(soonest, walk_quota.window_seconds)
    walked = max(k for k in range(len(ordered) + 1) if seconds(k) <= allowed)
    return ordered[:walked], ordered[walked:], seconds(walked)


@dataclass(frozen=True)
class ProfileCount:
    """Klaviyo's `profile_count` of a segment, and when it was answered."""

    value: Optional[int]
    answered_at: datetime


def count_differs(count: ProfileCount, held_count: int, join_times: Sequence[datetime]) -> bool:
    """Whether a count disagrees with the members held plus the joins it can have seen.

    The count may be asked before or after the incremental pass: joins dated after it was
    answered are not in it and are left out. A join dated before it but not visible to it yet
    only calls for a walk that finds nothing.
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
