"""`KlaviyoClient.get_profiles` over HTTP to the simulator, and the budget it draws on."""

from datetime import datetime, timedelta, timezone
from typing import Any, Dict, List

import pytest

from klaviyo_source.client import KlaviyoClient, resources_of
from klaviyo_source.endpoints import GET_PROFILES, GET_SEGMENT_PROFILES, Budget, tier_windows
from klaviyo_source.errors import KlaviyoBadRequest
from klaviyo_source.filters import filter_datetime, quoted
from klaviyo_source.simulator import Account, KlaviyoSimulator


@pytest.fixture
def client(simulator: KlaviyoSimulator) -> KlaviyoClient:
    return KlaviyoClient(simulator.api_key, simulator.base_url)


def _all(pages: Any) -> List[Dict[str, Any]]:
    return [resource for page in pages for resource in resources_of(page)]


def test_pages_through_every_profile_by_links_next(
    account: Account, client: KlaviyoClient, simulator: KlaviyoSimulator
) -> None:
    every = sorted(account.profiles())
    pages = list(client.get_profiles(page_size=50))
    assert [r["id"] for page in pages for r in resources_of(page)] == every
    assert len(pages) == -(-len(every) // 50)
    assert simulator.counters["get_profiles"] == len(pages)
    default_pages = list(client.get_profiles())
    assert all(len(resources_of(page)) == 100 for page in default_pages[:-1])


def test_profiles_updated_after_a_bound_sorted_by_updated(
    account: Account, client: KlaviyoClient
) -> None:
    bound = datetime.now(timezone.utc) - timedelta(seconds=1)
    picked = sorted(account.profiles())[7:10]
    for pid in reversed(picked):
        account.update_profile(pid, last_name="Changed")
    changed = _all(
        client.get_profiles(
            filter=f"greater-than(updated,{filter_datetime(bound)})", sort="updated"
        )
    )
    assert [r["id"] for r in changed] == list(reversed(picked))
    assert all(r["attributes"]["last_name"] == "Changed" for r in changed)


def test_fields_additional_fields_and_identifier_filters(
    account: Account, client: KlaviyoClient
) -> None:
    truth = account.profiles()
    some = sorted(pid for pid in truth if truth[pid]["email"])[:4]
    found = _all(
        client.get_profiles(
            filter=f"any(id,[{','.join(quoted(pid) for pid in some)}])",
            sort="-id",
            fields_profile=["email", "subscriptions"],
            additional_fields_profile=["subscriptions"],
            page_size=3,
        )
    )
    assert [r["id"] for r in found] == some[::-1]
    for resource in found:
        assert set(resource["attributes"]) == {"email", "subscriptions"}
        assert resource["attributes"]["email"] == truth[resource["id"]]["email"]


def test_a_filter_klaviyo_refuses_raises_bad_request(client: KlaviyoClient) -> None:
    bound = filter_datetime(datetime.now(timezone.utc) - timedelta(days=1))
    with pytest.raises(KlaviyoBadRequest, match="filter"):
        list(client.get_profiles(filter=f"greater-or-equal(updated,{bound})"))


def test_profiles_draw_on_their_own_large_budget() -> None:
    own = Budget("get_profiles", "L")
    assert GET_PROFILES.budgets() == (own,)
    assert GET_PROFILES.budgets(["subscriptions", "predictive_analytics"]) == (
        own,
        Budget("predictive_analytics", "M"),
    )
    assert GET_SEGMENT_PROFILES.budgets()[0] != own
    assert tier_windows("L", revision="2025-04-15") == [(75, 1.0), (700, 60.0)]
