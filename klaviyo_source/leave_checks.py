"""How a run looks for leaves: which segments are read whole, walked by id or counted, planned
once per run.

Klaviyo never says when a profile leaves a segment. A run sees a leave by listing every current
member of the segment, or suspects one when Klaviyo's `profile_count` differs from the members
held plus the joins just loaded (a count). Three quotas serve this, each separate:

- `GET /segments/{id}/profiles` (L tier; M with predictive_analytics) serves the incremental
  passes. A pass without its filter reads the segment whole: every member with its
  `joined_group_at`, so leaves, late joins and re-joins of any age show. For a segment of one
  page that costs what the filtered pass costs; a larger one costs its pages, spent from what
  the passes leave of the quota;
- `GET /segments/{id}/relationships/profiles` (L tier, a quota of its own) lists member ids,
  100 a page: every leave shows, and every join the pass could not see;
- `profile_count` (XS tier: 1/s, 15/min) costs one request whatever the segment's size, but a
  leave and a join the pass did not see cancel out.

A page costs 60/700 s of an L quota's steady window, a count 4 s of its own, so listing wins for
small segments and counting for the largest. The plan finds the earliest time by which every
segment can be checked, the three quotas working at once: the largest counted, the others' ids
walked, and those the walks' quota cannot take in time read whole from what the passes leave.
Within that time, or within the walks' first steady window if that is later (it costs no
waiting), ids are walked wherever they fit, since a listing misses nothing; the largest segments
are counted where they do not; and only what neither takes in time is read whole, since its
pages carry whole profiles.

What a count cannot see (a leave and a late join) and what no id walk can (a re-join dated
behind the lookback window: the id stays) is caught by each segment's scheduled read whole
(`full_reconcile_every_hours`). The plan is made in the pipeline's thread, once the listing is
read; the counts are asked by `profile_counts`.
"""

import enum
import math
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from . import settings

# Bisections of the time by which every segment can be checked: 2**-40 of the longest plan.
BISECTIONS = 40
# Seconds a time may be off by float rounding when turned back into requests.
ROUNDING = 1e-6


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

    def requests_within(self, seconds: float) -> int:
        """How many requests `seconds_for` fits in `seconds` (the first is sent at once)."""
        # Rounding must not lose the request `seconds_for` ends on (0.3 s a request: 3 * 0.1).
        seconds = max(0.0, seconds) + ROUNDING
        minutes = math.floor(seconds / 60.0)
        within = min(
            int(self.per_minute) - 1, math.floor((seconds - minutes * 60.0) * self.per_second)
        )
        return minutes * int(self.per_minute) + within + 1

    @property
    def window_seconds(self) -> float:
        """How long a whole steady window of requests takes: what is spent without waiting."""
        return self.seconds_for(int(self.per_minute))


@dataclass(frozen=True)
class LeavePolicy:
    """How leaves are looked for (`reconcile`), how often each segment is read whole, and the
    quotas of the passes, the id walks and the counts."""

    reconcile: str = settings.DEFAULT_RECONCILE
    full_walk_every: Optional[timedelta] = settings.DEFAULT_FULL_RECONCILE_EVERY
    pass_quota: Quota = Quota.of_tier("L", settings.DEFAULT_REVISION, 1.0)
    walk_quota: Quota = Quota.of_tier("L", settings.DEFAULT_REVISION, 1.0)
    count_quota: Quota = Quota.of_tier("XS", settings.DEFAULT_REVISION, 1.0)

    @classmethod
    def for_account(
        cls,
        reconcile: str,
        full_walk_every: Optional[timedelta],
        revision: str,
        share: float,
        pass_tier: str = "L",
    ) -> "LeavePolicy":
        """`pass_tier` is "M" when member pages carry predictive_analytics, whose tier is
        stricter than L on both windows."""
        return cls(
            reconcile=reconcile,
            full_walk_every=full_walk_every,
            pass_quota=Quota.of_tier(pass_tier, revision, share),
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
        """Pages a listing of its current members takes, as far as the run knows before it."""
        return max(1, math.ceil(self.held_count / settings.SEGMENT_PROFILES_PAGE_SIZE))


@dataclass(frozen=True)
class LeavePlan:
    """The check of each planned segment, and what the plan expects the run's requests for
    member lists and counts to cost."""

    checks: Mapping[str, LeaveCheck] = field(default_factory=dict)
    # Counted segments, largest first: the order their counts are asked in.
    counted: Tuple[str, ...] = ()
    walked_pages: int = 0
    pass_pages: int = 0  # the passes' requests, read whole or not
    seconds: float = 0.0

    def check_of(self, segment_id: str) -> LeaveCheck:
        return self.checks.get(segment_id, LeaveCheck.NONE)

    def describe(self) -> str:
        tally = {kind: 0 for kind in LeaveCheck}
        for check in self.checks.values():
            tally[check] += 1
        return (
            f"leave checks: {tally[LeaveCheck.READ_WHOLE]} segments read whole, "
            f"{tally[LeaveCheck.WALK_IDS]} walked by id, {tally[LeaveCheck.COUNT]} counted, "
            f"{tally[LeaveCheck.NONE]} not checked; {self.pass_pages} pages of members, "
            f"{self.walked_pages} of ids and {len(self.counted)} counts: about "
            f"{self.seconds:.0f} s at the rate limits"
        )


def plan_leave_checks(
    segments: Sequence[SegmentToCheck], policy: LeavePolicy, now: datetime
) -> LeavePlan:
    """Each segment's check for this run (see the module's docstring)."""
    checks: Dict[str, LeaveCheck] = {}
    to_split: List[SegmentToCheck] = []
    pass_pages = 0  # at least: a filtered pass may find more than a page of joins
    for segment in segments:
        check = _check_before_the_split(segment, policy, now)
        pass_pages += segment.pages if check is LeaveCheck.READ_WHOLE else 1
        if check is None:
            to_split.append(segment)
        else:
            checks[segment.segment_id] = check
    split = _split(to_split, policy, pass_pages)
    for kind, planned in (
        (LeaveCheck.WALK_IDS, split.walked),
        (LeaveCheck.READ_WHOLE, split.read),
        (LeaveCheck.COUNT, split.counted),
    ):
        checks.update(dict.fromkeys((segment.segment_id for segment in planned), kind))
    return LeavePlan(
        checks=checks,
        counted=tuple(segment.segment_id for segment in reversed(split.counted)),
        walked_pages=_pages(split.walked),
        pass_pages=pass_pages + _pages(split.read) - len(split.read),
        seconds=split.seconds,
    )


def _check_before_the_split(
    segment: SegmentToCheck, policy: LeavePolicy, now: datetime
) -> Optional[LeaveCheck]:
    """The check a segment gets whatever the others need; None if it is one of those shared
    out between the quotas."""
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


@dataclass(frozen=True)
class _Split:
    """Segments shared out between the quotas (each list smallest first), and how long the
    passes and checks take at the rate limits."""

    walked: Tuple[SegmentToCheck, ...] = ()
    read: Tuple[SegmentToCheck, ...] = ()
    counted: Tuple[SegmentToCheck, ...] = ()
    seconds: float = 0.0


def _pages(segments: Sequence[SegmentToCheck]) -> int:
    return sum(segment.pages for segment in segments)


def _split(segments: Sequence[SegmentToCheck], policy: LeavePolicy, pass_pages: int) -> _Split:
    """The segments walked by id, read whole and counted.

    First the soonest time by which every segment can be checked. Within it, or within the
    walks' first steady window if that is later: ids are walked where they fit (light pages,
    exact), the largest segments counted where they do not, and only what neither can take in
    time is read whole (its pages carry whole profiles). Counting everything always fits in
    its own time, and more time never makes a split impossible, so the soonest is found by
    bisection.
    """
    ordered = sorted(segments, key=lambda segment: (segment.pages, segment.segment_id))
    latest = max(
        policy.count_quota.seconds_for(len(ordered)), policy.pass_quota.seconds_for(pass_pages)
    )
    # Counting everything takes no longer than `latest`; a split found later is never slower.
    soonest = _within(ordered, policy, pass_pages, latest) or _timed(
        policy, pass_pages, [], [], ordered
    )
    earliest = 0.0
    for _ in range(BISECTIONS):
        middle = (earliest + latest) / 2
        found = _within(ordered, policy, pass_pages, middle)
        if found is None:
            earliest = middle
        else:
            latest, soonest = middle, found
    allowed = max(soonest.seconds, policy.walk_quota.window_seconds)
    walks_and_counts = _walks_and_fewest_counts(ordered, policy, pass_pages, allowed)
    if walks_and_counts is not None:
        return walks_and_counts
    within = _within(ordered, policy, pass_pages, allowed)
    return within if within is not None else soonest


def _within(
    ordered: Sequence[SegmentToCheck], policy: LeavePolicy, pass_pages: int, seconds: float
) -> Optional[_Split]:
    """A split done within `seconds`: the largest segments counted as far as the counts' quota
    allows, the others walked or read whole; None if they do not fit."""
    counting = min(len(ordered), policy.count_quota.requests_within(seconds))
    can_read = policy.pass_quota.requests_within(seconds) - pass_pages
    listed = ordered[: len(ordered) - counting]
    shared = _share_out(listed, policy.walk_quota.requests_within(seconds), max(0, can_read))
    if can_read < 0 or shared is None:
        return None
    return _timed(policy, pass_pages, *shared, ordered[len(listed) :])


def _walks_and_fewest_counts(
    ordered: Sequence[SegmentToCheck], policy: LeavePolicy, pass_pages: int, seconds: float
) -> Optional[_Split]:
    """The split done within `seconds` without reading any segment whole that counts fewest
    (the largest), or None if there is none. Counting one more never makes the rest harder to
    walk."""
    can_walk = policy.walk_quota.requests_within(seconds)

    def walked(counting: int) -> Optional[Tuple[List[SegmentToCheck], List[SegmentToCheck]]]:
        return _share_out(ordered[: len(ordered) - counting], can_walk, 0)

    can_count = min(len(ordered), policy.count_quota.requests_within(seconds))
    if walked(can_count) is None:
        return None
    fewest, most = 0, can_count
    while fewest < most:
        middle = (fewest + most) // 2
        if walked(middle) is None:
            fewest = middle + 1
        else:
            most = middle
    shared = walked(fewest)
    assert shared is not None
    return _timed(policy, pass_pages, *shared, ordered[len(ordered) - fewest :])


def _timed(
    policy: LeavePolicy,
    pass_pages: int,
    walked: Sequence[SegmentToCheck],
    read: Sequence[SegmentToCheck],
    counted: Sequence[SegmentToCheck],
) -> _Split:
    """A split and how long its quotas take, each at once: the passes with the whole reads,
    the id walks, the counts."""
    seconds = max(
        policy.walk_quota.seconds_for(_pages(walked)),
        policy.pass_quota.seconds_for(pass_pages + _pages(read) - len(read)),
        policy.count_quota.seconds_for(len(counted)),
    )
    return _Split(tuple(walked), tuple(read), tuple(counted), seconds)


def _share_out(
    segments: Sequence[SegmentToCheck], can_walk: int, can_read: int
) -> Optional[Tuple[List[SegmentToCheck], List[SegmentToCheck]]]:
    """Segments walked by id and read whole within those many pages, or None if they do not
    fit. The walks take the largest that fit (ids make light pages); the rest is read whole,
    which beyond the one request of its pass costs a page less than a walk."""
    walked: List[SegmentToCheck] = []
    read: List[SegmentToCheck] = []
    for segment in reversed(segments):
        if segment.pages <= can_walk:
            walked.append(segment)
            can_walk -= segment.pages
        else:
            read.append(segment)
    if sum(segment.pages - 1 for segment in read) > can_read:
        return None
    return walked[::-1], read[::-1]
