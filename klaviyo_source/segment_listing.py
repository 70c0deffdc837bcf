"""Which segments exist now: Klaviyo's listing, plus the held segments it no longer shows.

A segment loaded before and missing from today's listing is either deleted or simply no
longer selected (renamed out of a name filter, made inactive). One GET of that segment tells
which: a 404 means deleted, a 200 brings its current attributes. Configured segment ids
Klaviyo has never had are a user error.
"""

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Dict, Iterator, Optional, Sequence

from .client import KlaviyoClient
from .errors import KlaviyoConfigError, KlaviyoNotFound
from .run import Run


@dataclass(frozen=True)
class ListedSegment:
    """A segment as this run sees it: live (`resource`) or gone (`held_row` + `deleted_at`).

    `run` travels with each segment to its walk: what the run's walks share, made in the
    pipeline's own thread, where the listing runs.
    """

    id: str
    run: Run
    held_count: int = 0
    resource: Optional[Dict[str, Any]] = None
    held_row: Optional[Dict[str, Any]] = None
    deleted_at: Optional[datetime] = None
    selected: bool = True

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
    selection_filter: Optional[str],
    configured_ids: Sequence[str],
    run: Run,
) -> Iterator[ListedSegment]:
    """Yield every selected live segment, then every held segment that was deleted.

    The listing is read whole before anything is yielded, so that a misconfigured segment id
    fails the run before any segment is walked.
    """
    held = run.held
    counts = held.member_counts()
    # Keyed by id: a segment listed on two pages is walked once.
    live_by_id: Dict[str, ListedSegment] = {}
    for document in client.get_segments(filter=selection_filter, include=["tags"]):
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
    held_live = held.live_segments()
    unknown = [
        value
        for value in configured_ids
        if value not in listed and value not in held_live and _current(client, value) is None
    ]
    if unknown:
        raise KlaviyoConfigError(
            f"Klaviyo has no segment with id {', '.join(unknown)}. Fix [sources.klaviyo] "
            "segment_ids (or --segments): the id is the last part of the segment's URL in Klaviyo."
        )
    yield from live
    for segment_id, held_row in held_live.items():
        if segment_id in listed:
            continue
        resource = _current(client, segment_id)
        if resource is None:
            yield ListedSegment(id=segment_id, run=run, held_row=held_row, deleted_at=run.started)
        else:
            # Still in Klaviyo but no longer selected (made inactive, renamed out of a name
            # filter): its row is kept up to date, its members are no longer walked.
            yield ListedSegment(id=segment_id, run=run, resource=resource, selected=False)


def _current(client: KlaviyoClient, segment_id: str) -> Optional[Dict[str, Any]]:
    """The segment as Klaviyo has it now, or None if it does not exist (any more)."""
    try:
        document = client.get_segment(segment_id, include=["tags"])
    except KlaviyoNotFound:
        return None
    data = document.get("data")
    return data if isinstance(data, dict) else None
