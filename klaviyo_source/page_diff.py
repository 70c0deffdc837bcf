"""How one page of a segment's members differs from what the destination holds.

Pure functions: given a page's members, when each held member joined, what this run listed
already and the held rows of the members that need one, they say which rows to load. Reading
pages and the destination, and remembering what a run listed, is `memberships`' part.
"""

from dataclasses import dataclass, field
from datetime import datetime
from typing import List, Mapping, Optional, Sequence

from .held import HeldMembership
from .member_pages import Member
from .members_this_run import Sighting
from .rows import Row, membership_row, parse_datetime, profile_row


@dataclass(frozen=True)
class ListedMember:
    """A member of a page that may need a row: new, re-joined, or reloaded as it is held."""

    member: Member
    joined: datetime
    held_join: Optional[datetime]

    @property
    def id(self) -> str:
        return self.member.id

    @property
    def unchanged(self) -> bool:
        return self.held_join == self.joined


@dataclass
class PageDiff:
    """The rows one page brings, and what it says about the walk."""

    memberships: List[Row] = field(default_factory=list)
    # Held periods a re-join ended: their membership rows, ended before the new join.
    ended_earlier: List[Row] = field(default_factory=list)
    profiles: List[Row] = field(default_factory=list)
    joins: int = 0
    # Join times of members this segment's walks listed before in this run.
    repeated_joins: List[datetime] = field(default_factory=list)


def worth_a_look(
    members: Sequence[Member], held_joined: Mapping[str, datetime], reloading: bool
) -> List[ListedMember]:
    """The members of a page that may need a row.

    A member held with the same join is loaded already: it is passed over, unless the walk
    reloads everything it lists (its cursor was reset), when its row is written again with its
    history kept.
    """
    listed = []
    for member in members:
        joined = parse_datetime(member.joined_group_at)
        held_join = held_joined.get(member.id)
        if held_join == joined and not reloading:
            continue
        listed.append(ListedMember(member, joined, held_join))
    return listed


def ended_membership(
    segment_id: str,
    held: HeldMembership,
    before: datetime,
    reason: str,
    reconciled_at: Optional[datetime],
) -> Row:
    """The held membership, ended between when it was last seen and `before`.

    `reconciled_at` is the segment's last full walk: one that found the member present saw it
    then, even though no row changed.
    """
    last_seen = held.last_seen_at
    if (
        reconciled_at is not None
        and held.first_seen_at <= reconciled_at
        and reconciled_at > last_seen
    ):
        last_seen = reconciled_at
    return membership_row(
        segment_id,
        held.profile_id,
        held.joined_group_at,
        held.first_seen_at,
        last_seen,
        left_at_latest=before,
        left_reason=reason,
    )


def diff_page(
    segment_id: str,
    listed: Sequence[ListedMember],
    sightings: Sequence[Sighting],
    held_rows: Mapping[str, HeldMembership],
    now: datetime,
    reconciled_at: Optional[datetime],
    include_profiles: bool,
) -> PageDiff:
    """The rows `listed` (with what this run made of each, `sightings`) brings to the tables.

    A member listed before in this run is loaded once, as first listed. A held member with the
    same join keeps its first sighting; one with a new join re-joined, which ends its held
    period; anyone else joined. A profile's row comes with its first listing in the run.
    """
    diff = PageDiff()
    for listing, sighting in zip(listed, sightings, strict=True):
        if sighting is Sighting.REPEAT:
            diff.repeated_joins.append(listing.joined)
            continue
        previous = held_rows.get(listing.id)
        if previous is not None and listing.unchanged:
            first_seen = previous.first_seen_at
        else:
            first_seen = now
            if previous is None:
                diff.joins += 1
            else:
                diff.ended_earlier.append(
                    ended_membership(
                        segment_id, previous, listing.joined, "rejoined", reconciled_at
                    )
                )
        diff.memberships.append(
            membership_row(segment_id, listing.id, listing.joined, first_seen, now)
        )
        # Shaping a profile costs more than the rest of its row: only first listings are.
        if sighting is Sighting.NEW_PROFILE and include_profiles:
            diff.profiles.append(profile_row(listing.id, listing.member.profile_attributes()))
    return diff
