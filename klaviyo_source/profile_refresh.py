"""Profiles that stay current: the held profiles Klaviyo updated since the last run, reloaded.

A segment walk fetches a profile only when one of its memberships is new or read again, so a
member whose email changed while its memberships did not would keep the old address. Each run
therefore also lists `GET /api/profiles?filter=greater-than(updated,…)&sort=updated`, 100 a
page, under the profiles endpoint's own rate budget, and reloads the profiles among them that
the destination holds.

Which profiles: only those the destination holds, the profiles that are or were members of an
exported segment. The endpoint lists the whole account; one of ten million profiles with a few
thousand in the exported segments would otherwise fill `profiles` with rows no membership
points to. A profile that joins an exported segment is loaded by the walk that lists it.

The cursor: when the run of the last complete refresh started, in dlt state at
`sources.klaviyo.resources.profile_refresh.updated`. Every row a run loads was fetched after
the run started, so it holds every edit made before then, and a later edit is updated after
the cursor: the next run lists it. A run lists from `profile_lookback_minutes` before the
cursor, since an edit takes a moment to reach the filter and this machine's clock may differ
from Klaviyo's. What the window lists again unchanged (`updated` as held) is not loaded again,
and a listed row never replaces a held one Klaviyo updated later. `greater-than` is strict:
the filter starts a second early, so a profile updated at the window's very instant is listed.

The first run, without a cursor: on a first export the walks fetch every member, so nothing is
listed and the cursor starts at the run's start. A destination that already holds profiles
(loaded before this refresh existed, or its cursor was dropped) has each of them fetched once
by id, 100 a request: cheaper than listing every profile the account updated since then.

Deleted profiles: Klaviyo deletes a profile (a data-privacy request; a merge into another
profile retires an id too) without a trace in the API. The profile is gone from every listing
and its memberships end as leaves, which a reconciliation records. So each run asks by id for
the held profiles whose memberships all ended since the previous run; those Klaviyo no longer
has keep a row with `deleted_at` (when this pipeline found them gone) and every attribute
emptied, because the deletion was most likely a request to erase them. Those that exist keep
their rows, brought up to date.

Not seen: what Klaviyo changes without moving `updated` (its predictive analytics may be
such), until a walk lists the profile again; a profile deleted after its memberships ended,
since it is asked for once, when they end; a deleted profile whose leaves no reconciliation
has found yet (`reconcile = "off"` waits for the scheduled full walk).

One row per profile in a load: the walks write profile rows too, in parallel. Each writer
claims a profile in the run's `MembersThisRun` before writing its row (one lock), and whoever
comes second writes none. Both fetched the profile after the run started, so either row holds
every edit the cursor passes.

Threads: the resource starts the run and reads its cursor in the pipeline's thread, then reads
its pages in an extract worker (dlt's own wrapper for parallelized resources), where it touches
only the `Run` and the client. Back in the pipeline's thread once its last page was read, it
moves the cursor, or keeps it and names the failure among the run's failures; the rows fetched
before a failure still load.
"""

import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Dict, Generator, Iterator, List, Mapping, Optional, Sequence

import dlt
from dlt.extract.utils import wrap_parallel_iterator
from requests.exceptions import RequestException

from . import settings
from .arrow_tables import quiet_json_column_notices
from .client import Document, KlaviyoClient, resources_of
from .errors import (
    KlaviyoAPIError,
    KlaviyoAuthenticationError,
    KlaviyoConfigError,
    KlaviyoPermissionError,
    endpoint_not_served,
)
from .filters import any_id, updated_since
from .held import HeldProfile
from .rows import deleted_profile_row, parse_datetime, profile_row
from .run import Run, RunStart
from .walk_batch import WalkBatch
from .walk_tables import declare_walk_tables

logger = logging.getLogger(__name__)

# Held profile ids read from the destination at a time while catching up: the memory it takes
# stays flat however many profiles are held.
HELD_IDS_AT_A_TIME = 10_000

# A destination may keep times to the millisecond only (dlt's coarsest timestamp precision): a
# stamp read back is compared with a millisecond to spare. No more: two runs' starts can be
# under a second apart, and the previous run's stamps must fall outside the window.
STORED_TIME_SLACK = timedelta(milliseconds=1)


def profile_lookback(minutes: float) -> timedelta:
    """The refresh's look-back from the source's configuration."""
    if minutes < 0:
        raise KlaviyoConfigError(
            f"profile_lookback_minutes is {minutes}; it must be 0 or more. Fix "
            "[sources.klaviyo] profile_lookback_minutes."
        )
    return timedelta(minutes=minutes)


@dataclass
class RefreshStats:
    """What one refresh did, for its log line."""

    requests: int = 0
    listed: int = 0
    loaded: int = 0
    deleted: int = 0


@dataclass
class ProfileRefresh:
    """One run's refresh; `rows()` yields its table rows page by page."""

    client: KlaviyoClient
    run: Run
    cursor: Optional[datetime]
    lookback: timedelta
    additional_fields: Optional[List[str]] = None
    stats: RefreshStats = field(default_factory=RefreshStats)
    # Why the refresh stopped short; None once it read every page it meant to.
    failure: Optional[str] = None
    not_served: bool = False

    def __post_init__(self) -> None:
        self._batch = WalkBatch(self.run.load_id)

    def rows(self) -> Generator[Any, None, None]:
        """The rows to load; a failure is recorded in `failure`, not raised."""
        with self.run.held.kept_open():
            yield from self._rows()

    def _rows(self) -> Generator[Any, None, None]:
        try:
            if self.cursor is None:
                yield from self._catch_up()
            else:
                yield from self._updated_since(self.cursor - self.lookback)
                # Leaves the previous run recorded are stamped with its start, the cursor.
                left_since = self.cursor - STORED_TIME_SLACK
                yield from self._by_id(self.run.held.profiles_that_left(left_since))
        except (KlaviyoAuthenticationError, KlaviyoPermissionError):
            raise  # the key is wrong for every request: stop the run with Klaviyo's reason
        except KlaviyoAPIError as error:
            if endpoint_not_served(error):
                # A proxy or stand-in without the endpoint: there is nothing to refresh from.
                self.not_served = True
                logger.warning(
                    f"profiles are not refreshed: {error} The cursor stays; profiles are "
                    "still loaded by the segment walks."
                )
            else:
                self._fail(error)
        except RequestException as error:
            self._fail(error)
        yield from self._batch.flush()

    def _fail(self, error: Exception) -> None:
        self.failure = (
            f"profile refresh: {error} Profiles keep their refresh cursor; the next run "
            "lists them again from it."
        )
        logger.error(self.failure)

    def _pages(self, filter: str, sort: Optional[str] = None) -> Iterator[List[Document]]:
        pages = self.client.get_profiles(
            filter=filter, sort=sort, additional_fields_profile=self.additional_fields
        )
        for page in pages:
            self.stats.requests += 1
            resources = resources_of(page)
            self.stats.listed += len(resources)
            yield resources

    def _updated_since(self, since: datetime) -> Iterator[Any]:
        for resources in self._pages(updated_since(since), sort="updated"):
            yield from self._reloaded(resources)

    def _catch_up(self) -> Iterator[Any]:
        """Every held profile by id, a chunk of ids at a time."""
        after = ""
        while ids := self.run.held.live_profile_ids(after, HELD_IDS_AT_A_TIME):
            yield from self._by_id(ids)
            after = ids[-1]

    def _by_id(self, profile_ids: Sequence[str]) -> Iterator[Any]:
        """The current rows of these held profiles; those Klaviyo no longer has, deleted."""
        for start in range(0, len(profile_ids), settings.PROFILE_IDS_PER_REQUEST):
            asked = profile_ids[start : start + settings.PROFILE_IDS_PER_REQUEST]
            found = [resource for page in self._pages(any_id(asked)) for resource in page]
            yield from self._reloaded(found)
            present = {resource["id"] for resource in found}
            yield from self._deleted([pid for pid in asked if pid not in present])

    def _reloaded(self, resources: Sequence[Document]) -> Iterator[Any]:
        """Rows of the held profiles Klaviyo updated after the held row, unless this run
        wrote their rows already."""
        held = self.run.held.profiles_among([resource["id"] for resource in resources])
        newer = [resource for resource in resources if _newer(resource, held)]
        claimed = self.run.members.claim_profiles([resource["id"] for resource in newer])
        rows = [
            profile_row(resource["id"], resource.get("attributes") or {})
            for resource, mine in zip(newer, claimed, strict=True)
            if mine
        ]
        self.stats.loaded += len(rows)
        yield from self._batch.add([], [], rows)

    def _deleted(self, profile_ids: Sequence[str]) -> Iterator[Any]:
        """Rows marking deleted the held profiles among these that are not marked yet."""
        if not profile_ids:
            return
        held = self.run.held.profiles_among(profile_ids)
        live = [pid for pid in profile_ids if pid in held and not held[pid].deleted]
        claimed = self.run.members.claim_profiles(live)
        rows = [
            deleted_profile_row(pid, self.run.started)
            for pid, mine in zip(live, claimed, strict=True)
            if mine
        ]
        self.stats.deleted += len(rows)
        yield from self._batch.add([], [], rows)


def _newer(resource: Document, held: Mapping[str, HeldProfile]) -> bool:
    """Whether a listed profile is held, and Klaviyo updated it after the held row."""
    known = held.get(resource["id"])
    if known is None:
        return False  # never a member of an exported segment
    if known.deleted or known.updated is None:
        return True
    updated = (resource.get("attributes") or {}).get("updated")
    return updated is None or parse_datetime(updated) > known.updated


def refresh_profiles(
    client: KlaviyoClient,
    run_start: RunStart,
    lookback: timedelta,
    additional_fields: Optional[List[str]] = None,
) -> Iterator[Any]:
    """The body of the profile refresh resource.

    Starts in the pipeline's thread; its pages are read in an extract worker; the cursor is
    written back in the pipeline's thread (see the module's docstring).
    """
    run = run_start()
    resource_name = settings.PROFILE_REFRESH_RESOURCE
    declare_walk_tables(
        dlt.current.source().resources[resource_name],
        run.appended,
        tables=(settings.PROFILES_TABLE,),
    )
    quiet_json_column_notices(resource_name)
    state: Dict[str, Any] = dlt.current.resource_state(resource_name)
    stored = state.get(settings.PROFILES_CURSOR_STATE_KEY)
    refresh = ProfileRefresh(
        client,
        run,
        cursor=parse_datetime(stored) if stored else None,
        lookback=lookback,
        additional_fields=additional_fields,
    )
    yield from wrap_parallel_iterator(refresh.rows())
    # In the pipeline's thread again, after the worker read the last page.
    if refresh.failure is not None:
        run.progress.failed(settings.PROFILE_REFRESH_FAILURE, refresh.failure)
        return
    if refresh.not_served:
        return
    state[settings.PROFILES_CURSOR_STATE_KEY] = run.started.isoformat()
    stats = refresh.stats
    logger.info(
        f"profiles: {stats.loaded} reloaded, {stats.deleted} marked deleted; {stats.listed} "
        f"listed in {stats.requests} requests"
    )
