"""Every documented parameter of the ten client operations, spoken over HTTP to the simulator."""

from collections import Counter
from datetime import timedelta
from typing import Any, Dict, List

import pytest

from klaviyo_source.client import KlaviyoClient, resources_of
from klaviyo_source.errors import (
    KlaviyoAuthenticationError,
    KlaviyoBadRequest,
    KlaviyoConfigError,
    KlaviyoNotFound,
    KlaviyoPermissionError,
)
from klaviyo_source.filters import filter_datetime, quoted
from klaviyo_source.quota import RateLimiter
from klaviyo_source.rows import parse_datetime
from klaviyo_source.simulator import Account, KlaviyoSimulator

NEWEST_REVISION = "2026-07-15"  # page[size] on /segments and /tags, profile_id filters


@pytest.fixture
def client(simulator: KlaviyoSimulator) -> KlaviyoClient:
    return KlaviyoClient(simulator.api_key, simulator.base_url)


@pytest.fixture
def newest_client(simulator: KlaviyoSimulator) -> KlaviyoClient:
    return KlaviyoClient(simulator.api_key, simulator.base_url, revision=NEWEST_REVISION)


def _all(pages: Any) -> List[Dict[str, Any]]:
    return [resource for page in pages for resource in resources_of(page)]


def _populated(account: Account) -> str:
    return max(account.memberships().items(), key=lambda item: len(item[1]))[0]


def test_get_segments_with_every_parameter(
    account: Account, newest_client: KlaviyoClient, simulator: KlaviyoSimulator
) -> None:
    segments = account.segments()
    starred = {sid for sid, attrs in segments.items() if attrs["is_starred"]}
    pages = list(
        newest_client.get_segments(
            filter="equals(is_starred,true)",
            sort="-name",
            fields_segment=["name", "is_starred"],
            fields_tag=["name"],
            fields_flow=["name"],
            include=["tags"],
            page_size=2,
        )
    )
    resources = [r for page in pages for r in resources_of(page)]
    assert {r["id"] for r in resources} == starred
    assert [r["attributes"]["name"] for r in resources] == sorted(
        (segments[sid]["name"] for sid in starred), reverse=True
    )
    assert all(set(r["attributes"]) == {"name", "is_starred"} for r in resources)
    assert len(pages) == max(1, -(-len(starred) // 2))
    included = {tag["id"] for page in pages for tag in page.get("included", [])}
    assert included == {tag for sid, tag in account.segment_tags() if sid in starred}
    assert simulator.counters["get_segments"] == len(pages)


def test_get_segments_filters_on_id_name_dates_and_active(
    account: Account, client: KlaviyoClient
) -> None:
    segments = account.segments()
    some = sorted(segments)[:3]
    by_id = _all(client.get_segments(filter=f"any(id,[{','.join(quoted(s) for s in some)}])"))
    assert {r["id"] for r in by_id} == set(some)
    name = segments[some[0]]["name"]
    by_name = _all(client.get_segments(filter=f"equals(name,{quoted(name)})"))
    assert {r["id"] for r in by_name} == {sid for sid, a in segments.items() if a["name"] == name}
    oldest = min(a["created"] for a in segments.values())
    created = _all(client.get_segments(filter=f"greater-than(created,{filter_datetime(oldest)})"))
    assert {r["id"] for r in created} == {
        sid for sid, a in segments.items() if a["created"] > oldest.replace(microsecond=0)
    }
    active = _all(client.get_segments(filter="equals(is_active,false)", sort="updated"))
    assert {r["id"] for r in active} == {sid for sid, a in segments.items() if not a["is_active"]}


def test_get_segment_with_profile_count_and_include(
    account: Account, client: KlaviyoClient
) -> None:
    segment_id = _populated(account)
    document = client.get_segment(
        segment_id,
        fields_segment=["name", "profile_count"],
        fields_tag=["name"],
        fields_flow=["name"],
        include=["tags"],
        additional_fields_segment=["profile_count"],
    )
    assert document["data"]["id"] == segment_id
    assert document["data"]["attributes"]["profile_count"] == account.profile_count(segment_id)
    assert {t["id"] for t in document.get("included", [])} == {
        tag for sid, tag in account.segment_tags() if sid == segment_id
    }


def test_get_segment_profiles_with_every_parameter(
    account: Account, newest_client: KlaviyoClient
) -> None:
    segment_id = _populated(account)
    members = account.members(segment_id)
    ordered = sorted(members.values())
    low, high = ordered[len(ordered) // 4], ordered[3 * len(ordered) // 4]
    window = (
        f"and(greater-or-equal(joined_group_at,{filter_datetime(low)}),"
        f"less-than(joined_group_at,{filter_datetime(high)}))"
    )
    pages = list(
        newest_client.get_segment_profiles(
            segment_id,
            filter=window,
            sort="-joined_group_at",
            fields_profile=["email", "joined_group_at", "subscriptions", "predictive_analytics"],
            additional_fields_profile=["subscriptions", "predictive_analytics"],
            page_size=7,
        )
    )
    listed = [member for page in pages for member in page]
    # One snapshot: profiles() deep-copies the whole account, far too costly per member.
    profiles = account.profiles()
    expected = {
        pid
        for pid, joined in members.items()
        if low.replace(microsecond=0) <= joined < high.replace(microsecond=0)
    }
    assert {member.id for member in listed} == expected
    joined = [parse_datetime(member.joined_group_at) for member in listed]
    assert joined == sorted(joined, reverse=True)
    assert all(len(page) <= 7 for page in pages)
    for member in listed:
        attributes = member.profile_attributes()
        assert set(attributes) == {
            "email",
            "joined_group_at",
            "subscriptions",
            "predictive_analytics",
        }
        assert attributes["joined_group_at"] == member.joined_group_at
        assert attributes["email"] == profiles[member.id]["email"]

    one = next(
        pid for pid in members if profiles[pid].get("email") and profiles[pid].get("phone_number")
    )
    for expression in (
        f"equals(email,{quoted(profiles[one]['email'])})",
        f"any(phone_number,[{quoted(profiles[one]['phone_number'])}])",
        f"equals(profile_id,{quoted(one)})",
    ):
        found = newest_client.get_segment_profiles(segment_id, filter=expression)
        assert [member.id for page in found for member in page] == [one], expression


def test_every_page_of_a_walk_spends_the_budgets_of_the_first(account: Account) -> None:
    # predictive_analytics costs the M tier, 10 a second, on every page: at ten times Klaviyo's
    # pace one thread reading pages back to back would overrun it if next pages spent less.
    segment_id = _populated(account)
    with KlaviyoSimulator(account, rate_limits=True, time_scale=10) as served:
        client = KlaviyoClient(
            served.api_key, served.base_url, rate_limiter=RateLimiter(time_scale=10)
        )
        pages = list(
            client.get_segment_profiles(
                segment_id, additional_fields_profile=["predictive_analytics"], page_size=25
            )
        )
        statuses = [record.status for record in served.request_log]
        charged = Counter(charge.bucket for charge in served.limiter.charged)

    assert len(pages) > 20
    assert statuses == [200] * len(pages)
    assert charged == {
        "get_segment_profiles": len(pages),
        "additional-fields:predictive_analytics": len(pages),
    }


def test_get_segment_relationships_profiles(account: Account, client: KlaviyoClient) -> None:
    segment_id = _populated(account)
    members = account.members(segment_id)
    newest = max(members.values())
    since = newest - timedelta(days=30)
    ids = _all(
        client.get_segment_relationships_profiles(
            segment_id,
            filter=f"greater-than(joined_group_at,{filter_datetime(since)})",
            sort="joined_group_at",
            page_size=50,
        )
    )
    recent = {
        pid: joined for pid, joined in members.items() if joined > since.replace(microsecond=0)
    }
    # The spec's sort=joined_group_at is ascending on that field; it says nothing of ties.
    # The simulator pages by the unique key (joined_group_at, profile id), so ties come in
    # profile-id order, and the window holds a bulk import's worth of them.
    assert len(set(recent.values())) < len(recent)
    assert [r["id"] for r in ids] == sorted(recent, key=lambda pid: (recent[pid], pid))
    assert all(set(r) == {"type", "id"} for r in ids)
    every = _all(client.get_segment_relationships_profiles(segment_id))
    assert {r["id"] for r in every} == set(members)


def test_segment_tags_and_tag_ids(account: Account, client: KlaviyoClient) -> None:
    segment_id, _ = sorted(account.segment_tags())[0]
    expected = {tag for sid, tag in account.segment_tags() if sid == segment_id}
    tags = resources_of(client.get_segment_tags(segment_id, fields_tag=["name"]))
    assert {t["id"] for t in tags} == expected
    assert all(t["attributes"]["name"] == account.tags()[t["id"]] for t in tags)
    ids = resources_of(client.get_segment_relationships_tags(segment_id))
    assert {t["id"] for t in ids} == expected


def test_get_tags_with_every_parameter(account: Account, newest_client: KlaviyoClient) -> None:
    tags = account.tags()
    pages = list(
        newest_client.get_tags(
            sort="-name",
            fields_tag=["name"],
            fields_tag_group=["name"],
            include=["tag-group"],
            page_size=2,
        )
    )
    names = [r["attributes"]["name"] for page in pages for r in resources_of(page)]
    assert names == sorted(tags.values(), reverse=True)
    first = sorted(tags.values())[0]
    found = _all(newest_client.get_tags(filter=f"equals(name,{quoted(first)})", sort="id"))
    assert {r["attributes"]["name"] for r in found} == {first}
    prefix = _all(newest_client.get_tags(filter=f"starts-with(name,{quoted(first[:2])})"))
    assert {r["attributes"]["name"] for r in prefix} == {
        n for n in tags.values() if n.startswith(first[:2])
    }


def test_create_update_delete_segment(account: Account, client: KlaviyoClient) -> None:
    definition = {
        "condition_groups": [
            {
                "conditions": [
                    {
                        "type": "profile-property",
                        "property": "properties['Loyalty Tier']",
                        "filter": {"type": "string", "operator": "equals", "value": "Gold"},
                    }
                ]
            }
        ]
    }
    created = client.create_segment("Gold tier", definition, is_starred=True)
    segment_id = created["data"]["id"]
    assert account.segments()[segment_id]["name"] == "Gold tier"
    assert account.segments()[segment_id]["is_starred"] is True
    client.update_segment(segment_id, name="Gold tier (renamed)", is_starred=False)
    assert account.segments()[segment_id]["name"] == "Gold tier (renamed)"
    client.delete_segment(segment_id)
    assert segment_id not in account.segments()
    with pytest.raises(KlaviyoNotFound):
        client.get_segment(segment_id)


def test_errors_are_typed_and_carry_klaviyo_code_and_detail(
    simulator: KlaviyoSimulator, client: KlaviyoClient
) -> None:
    with pytest.raises(KlaviyoBadRequest) as bad:
        list(client.get_segments(filter="equals(name,unquoted)"))
    assert bad.value.status == 400 and bad.value.code == "invalid" and bad.value.detail
    with pytest.raises(KlaviyoNotFound) as missing:
        client.get_segment("NoSuch")
    assert missing.value.status == 404
    with pytest.raises(KlaviyoAuthenticationError) as unauthorised:
        list(KlaviyoClient("pk_wrong", simulator.base_url).get_segments())
    assert unauthorised.value.status == 401
    assert "pk_wrong" not in str(unauthorised.value)


def test_missing_scope_is_a_permission_error_naming_the_scope(account: Account) -> None:
    with KlaviyoSimulator(account, api_keys={"pk_segments_only": {"segments:read"}}) as served:
        client = KlaviyoClient("pk_segments_only", served.base_url)
        with pytest.raises(KlaviyoPermissionError) as denied:
            list(client.get_tags())
    assert denied.value.status == 403
    assert "tags:read" in str(denied.value)


@pytest.mark.parametrize(
    ("base_url", "revision"),
    [("a.klaviyo.com", "2025-04-15"), ("https://a.klaviyo.com", "April 2025")],
)
def test_unusable_settings_fail_before_any_request(base_url: str, revision: str) -> None:
    with pytest.raises(KlaviyoConfigError) as raised:
        KlaviyoClient("pk_x", base_url, revision)
    assert "[sources.klaviyo]" in str(raised.value)
