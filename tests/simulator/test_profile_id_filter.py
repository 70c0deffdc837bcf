"""The segment-member endpoints filter on `profile_id` from revision 2025-10-15 only: a list of
ids answers the members among them; an earlier revision refuses the filter with a 400."""

from __future__ import annotations

from typing import Any

import pytest

from klaviyo_source.simulator import Account, KlaviyoSimulator


@pytest.mark.parametrize("endpoint", ["profiles", "relationships/profiles"])
def test_a_list_of_ids_answers_the_members_among_them_from_revision_2025_10_15(
    endpoint: str, sim: KlaviyoSimulator, tools: Any, sim_account: Account
) -> None:
    segment_id, held = next(
        (sid, held)
        for sid, held in sorted(sim_account.memberships().items())
        if 3 <= len(held) < len(sim_account.profiles())
    )
    members = sorted(held)[:3]
    outsider = next(pid for pid in sorted(sim_account.profiles()) if pid not in held)
    listed = ",".join(f'"{pid}"' for pid in [*members, outsider])
    params = {"filter": f"any(profile_id,[{listed}])", "sort": "joined_group_at"}
    path = f"/api/segments/{segment_id}/{endpoint}"

    answered = tools.Client(sim, revision="2025-10-15").get(path, params)
    refused = tools.Client(sim, revision="2025-07-15").get(path, params)

    assert answered.status_code == 200, answered.text
    assert sorted(item["id"] for item in answered.json()["data"]) == members
    assert refused.status_code == 400
    (error,) = refused.json()["errors"]
    assert error["source"] == {"parameter": "filter"}
