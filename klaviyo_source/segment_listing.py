"""Which segments exist now: Klaviyo's listing, plus the held segments it no longer shows.

A segment loaded before and missing from today's listing is either deleted or simply no
longer selected (renamed out of a name filter, made inactive). One GET of that segment tells
which: a 404 means deleted, a 200 brings its current attributes. A configured segment id or
name Klaviyo does not have is a user error: the run fails, naming the closest segments, rather
than exporting nothing.

Once the whole listing is read, the run's leave checks are planned (`leave_checks`): each live
segment travels to its walk with its check, and counted segments come last, so that their
counts, asked meanwhile, are in by the time their walks need them.
"""

import dataclasses
import difflib
import json
import logging
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

from .client import KlaviyoClient
from .errors import KlaviyoConfigError, KlaviyoNotFound
from .filters import SegmentSelection
from .leave_checks import LeaveCheck, LeavePolicy, SegmentToCheck, plan_leave_checks
from .profile_counts import ProfileCount, count_in_background
from .run import Run

logger = logging.getLogger(__name__)

# How many existing segments an unknown id or name is shown beside.
CLOSEST_SHOWN = 3


@dataclass(frozen=True)
class ListedSegment:
    """A segment as this run sees it: live (`resource`) or gone (`held_row` + `deleted_at`).

    `run` travels with each segment to its walk: what the run's walks share, made in the
    pipeline's own thread, where the listing runs. So does its leave check, and for a counted
    segment the future of its `profile_count`.
    """

    id: str
    run: Run
    held_count: int = 0
    resource: Optional[Dict[str, Any]] = None
    held_row: Optional[Dict[str, Any]] = None
    deleted_at: Optional[datetime] = None
    selected: bool = True
    leave_check: LeaveCheck = LeaveCheck.NONE
    profile_count: Optional["Future[ProfileCount]"] = None

    @property
    def is_processing(self) -> bool:
        return bool((self.resource or {}).get("attributes", {}).get("is_processing"))

    @property
    def name(self) -> Optional[str]:
        if self.resource is not None:
            return (self.resource.get("attributes") or {}).get("name")
        return (self.held_row or {}).get("name")


def list_segments(
    client: KlaviyoClient,
    selection: SegmentSelection,
    configured_ids: Sequence[str],
    run: Run,
    leave_policy: LeavePolicy,
    on_listed: Optional[Callable[[List[ListedSegment]], None]] = None,
) -> Iterator[ListedSegment]:
    """Yield every selected live segment, then every held segment that was deleted.

    The listing is read whole before anything is yielded, so that a misconfigured segment id
    or name fails the run before any segment is walked, and so that the leave checks are
    planned over every segment. `on_listed` then gets the live ones at once (the segment reports
    need them all, not one at a time).
    """
    with run.held.kept_open():
        counts = run.held.member_counts()
        held_live = run.held.live_segments()
    # Keyed by id: a segment listed on two pages is walked once.
    live_by_id: Dict[str, ListedSegment] = {}
    for document in client.get_segments(filter=selection.filter, include=["tags"]):
        for resource in document.get("data") or []:
            live_by_id.setdefault(
                resource["id"],
                ListedSegment(
                    id=resource["id"],
                    run=run,
                    held_count=counts.get(resource["id"], 0),
                    resource=resource,
                ),
            )
    live = list(live_by_id.values())
    listed = set(live_by_id)
    unknown_ids = [
        value
        for value in configured_ids
        if value not in listed and value not in held_live and _current(client, value) is None
    ]
    listed_names = {segment.name for segment in live}
    # A name missing from the listing may belong to a segment the other conditions leave out
    # (is_active, is_starred): only a name no segment has is an error.
    unlisted_names = [name for name in selection.names if name not in listed_names]
    if unknown_ids or unlisted_names:
        _fail_on_unknown(client, unknown_ids, unlisted_names)
    run.progress.expect(len(live))
    if on_listed is not None:
        on_listed(live)
    yield from _with_leave_checks(client, live, run, leave_policy)
    for segment_id, held_row in held_live.items():
        if segment_id in listed:
            continue
        resource = _current(client, segment_id)
        if resource is None:
            run.progress.expect(1)
            yield ListedSegment(id=segment_id, run=run, held_row=held_row, deleted_at=run.started)
        else:
            # Still in Klaviyo but no longer selected (made inactive, renamed out of a name
            # filter): its row is kept up to date, its members are no longer walked.
            yield ListedSegment(id=segment_id, run=run, resource=resource, selected=False)


def _with_leave_checks(
    client: KlaviyoClient, live: Sequence[ListedSegment], run: Run, policy: LeavePolicy
) -> List[ListedSegment]:
    """The live segments with their planned checks, counted ones last; their counts asked."""
    plan = plan_leave_checks(
        [
            SegmentToCheck(
                segment_id=segment.id,
                held_count=segment.held_count,
                walked_before=run.progress.cursor(segment.id) is not None,
                is_processing=segment.is_processing,
                read_whole_at=run.progress.reconciled_at(segment.id),
            )
            for segment in live
        ],
        policy,
        run.started,
    )
    logger.info(plan.describe())
    counts = count_in_background(client, plan.counted)
    by_id = {segment.id: segment for segment in live}
    return [
        dataclasses.replace(segment, leave_check=plan.check_of(segment.id))
        for segment in live
        if segment.id not in counts
    ] + [
        dataclasses.replace(by_id[sid], leave_check=LeaveCheck.COUNT, profile_count=future)
        for sid, future in counts.items()
    ]


def _fail_on_unknown(
    client: KlaviyoClient, unknown_ids: Sequence[str], unlisted_names: Sequence[str]
) -> None:
    """Raise, naming the closest existing segments, if any id or name matches no segment."""
    existing = _all_segment_names(client)
    unknown_names = [name for name in unlisted_names if name not in existing.values()]
    problems: List[str] = []
    if unknown_ids:
        shown = {key: f"{key} {_quoted(name)}" for key, name in existing.items()}
        problems.append(
            f"Klaviyo has no segment with id {', '.join(unknown_ids)} "
            f"({_closest(unknown_ids, shown)}). Fix [sources.klaviyo] segment_ids (or "
            "--segments): the id is the last part of the segment's URL in Klaviyo."
        )
    if unknown_names:
        shown = {name: _quoted(name) for name in existing.values()}
        problems.append(
            f"Klaviyo has no segment named {', '.join(_quoted(name) for name in unknown_names)} "
            f"({_closest(unknown_names, shown)}). Fix [sources.klaviyo] segment_names (or "
            "--segment-name): a name must match a segment's name exactly."
        )
    if problems:
        raise KlaviyoConfigError(" ".join(problems))


def _all_segment_names(client: KlaviyoClient) -> Dict[str, str]:
    """Every segment of the account, id to name: asked only when a selection matched none."""
    names: Dict[str, str] = {}
    for document in client.get_segments(fields_segment=["name"]):
        for resource in document.get("data") or []:
            names[resource["id"]] = str((resource.get("attributes") or {}).get("name") or "")
    return names


def _closest(asked: Sequence[str], shown: Dict[str, str]) -> str:
    """The existing segments most like what was asked for, as `closest: a, b, c`."""
    if not shown:
        return "the account has no segments"
    candidates: List[str] = []
    for value in asked:
        for match in difflib.get_close_matches(value, list(shown), n=CLOSEST_SHOWN, cutoff=0):
            if match not in candidates:
                candidates.append(match)
    return "closest: " + ", ".join(shown[match] for match in candidates[:CLOSEST_SHOWN])


def _quoted(name: str) -> str:
    # JSON quoting shows a name's own quotes and commas unambiguously, its letters as they are.
    return json.dumps(name, ensure_ascii=False)


def _current(client: KlaviyoClient, segment_id: str) -> Optional[Dict[str, Any]]:
    """The segment as Klaviyo has it now, or None if it does not exist (any more)."""
    try:
        document = client.get_segment(segment_id, include=["tags"])
    except KlaviyoNotFound:
        return None
    data = document.get("data")
    return data if isinstance(data, dict) else None
