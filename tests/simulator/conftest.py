"""Fixtures for the simulator tests: small generated accounts, running simulators, an HTTP
client that speaks to them with real requests, and validators built from the official spec."""

from __future__ import annotations

import copy
import json
import sys
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import requests

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from klaviyo_source.simulator import Account, KlaviyoSimulator, generate_account  # noqa: E402

# Everything the tests read lives in the repository, so a plain clone can run them; see
# klaviyo_openapi/README.md for where these files come from and how to refresh them.
SPEC_DIR = Path(__file__).resolve().parent / "klaviyo_openapi"
SPEC_PATH = SPEC_DIR / "segments-subset.json"
EXAMPLES = SPEC_DIR / "examples"
REVISION = "2026-07-15"
SMALL = {"segments": 8, "tags": 6, "profiles": 900, "memberships": 2600}


class Client:
    """A keep-alive ``requests`` session preconfigured for one simulator."""

    def __init__(self, sim: KlaviyoSimulator, key: str | None = None, revision: str = REVISION):
        self.sim = sim
        self.session = requests.Session()
        self.session.trust_env = False
        self.session.headers.update(
            {
                "Authorization": f"Klaviyo-API-Key {key or sim.api_key}",
                "revision": revision,
                "Accept": "application/vnd.api+json",
            }
        )

    def url(self, path: str) -> str:
        return self.sim.base_url + path

    def get(self, path: str, params: Any = None, **kwargs: Any) -> requests.Response:
        """GET a path (``/api/...``) or an absolute URL (a ``links.next``)."""
        url = path if path.startswith("http") else self.url(path)
        return self.session.get(url, params=params, timeout=10, **kwargs)

    def request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        return self.session.request(method, self.url(path), timeout=10, **kwargs)

    def walk(self, path: str, params: Any = None) -> list[dict[str, Any]]:
        """Follow ``links.next`` verbatim; return every page's JSON."""
        pages = []
        resp = self.get(path, params)
        while True:
            assert resp.status_code == 200, resp.text
            doc = resp.json()
            pages.append(doc)
            nxt = doc["links"].get("next")
            if not nxt:
                return pages
            resp = self.get(nxt)


def rows(pages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """All ``data`` items of a walk."""
    return [item for page in pages for item in page["data"]]


def parse_dt(value: str) -> datetime:
    """Parse the API's datetimes (offset, ``Z``, fractions)."""
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def to_api_json(value: Any) -> Any:
    """Ground-truth value as it must appear in JSON (datetimes -> aware ``datetime``
    compared after parsing); used by ``normalise``."""
    if isinstance(value, datetime):
        return ("dt", value)
    if isinstance(value, dict):
        return {k: to_api_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [to_api_json(v) for v in value]
    return value


def normalise_api(value: Any, like: Any) -> Any:
    """Turn API JSON into the ``to_api_json`` shape, parsing strings where truth has datetimes."""
    if isinstance(like, tuple) and like and like[0] == "dt" and isinstance(value, str):
        return ("dt", parse_dt(value))
    if isinstance(value, dict) and isinstance(like, dict):
        return {k: normalise_api(v, like.get(k)) for k, v in value.items()}
    if isinstance(value, list) and isinstance(like, list):
        return [normalise_api(v, like[i] if i < len(like) else None) for i, v in enumerate(value)]
    return value


@pytest.fixture(scope="session")
def spec() -> dict[str, Any]:
    """The official 2026-07-15 subset, with the two documented spec-vs-reality gaps
    tolerated: nullable ``links.next/prev`` and null ``location.latitude/longitude``."""
    doc = json.loads(SPEC_PATH.read_text())
    patched = copy.deepcopy(doc)
    schemas = patched["components"]["schemas"]
    for name in ("prev", "next"):
        schemas["CollectionLinks"]["properties"][name]["nullable"] = True
    for name in ("latitude", "longitude"):
        prop = schemas["ProfileLocation"]["properties"][name]
        prop["oneOf"] = [{"type": "string", "nullable": True}, {"type": "number"}]
    return patched


@pytest.fixture(scope="session")
def raw_spec() -> dict[str, Any]:
    """The unpatched official spec."""
    return json.loads(SPEC_PATH.read_text())  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def sim_account() -> Account:
    """A small generated account shared by read-only tests of one module."""
    return generate_account(seed=3, **SMALL)


@pytest.fixture(scope="module")
def sim(sim_account: Account) -> Iterator[KlaviyoSimulator]:
    """A simulator (rate limits off) over ``sim_account``, one per module."""
    with KlaviyoSimulator(sim_account, rate_limits=False) as served:
        yield served


@pytest.fixture
def client(sim: KlaviyoSimulator) -> Client:
    return Client(sim)


@pytest.fixture
def fresh_sim() -> Iterator[KlaviyoSimulator]:
    """A simulator over a tiny account of its own, for tests that mutate state."""
    account = generate_account(seed=5, segments=5, tags=4, profiles=300, memberships=700)
    with KlaviyoSimulator(account, rate_limits=False) as served:
        yield served


@pytest.fixture
def fresh(fresh_sim: KlaviyoSimulator) -> Client:
    return Client(fresh_sim)


def largest_segment(account: Account) -> str:
    """Id of the segment with the most members."""
    return max(account.segments(), key=account.profile_count)


class Tools:
    """Helpers handed to tests through the ``tools`` fixture (conftest modules are not
    importable by name when several exist)."""

    Client = Client
    rows = staticmethod(rows)
    parse_dt = staticmethod(parse_dt)
    to_api_json = staticmethod(to_api_json)
    normalise_api = staticmethod(normalise_api)
    largest_segment = staticmethod(largest_segment)
    EXAMPLES = EXAMPLES
    REVISION = REVISION


@pytest.fixture(scope="session")
def tools() -> type[Tools]:
    return Tools


class SchemaChecker:
    """Validates bodies against the response schema the spec declares for an operation."""

    def __init__(self, spec: dict[str, Any]) -> None:
        from openapi_schema_validator import OAS30Validator, oas30_format_checker

        self.spec = spec
        self._cls = OAS30Validator
        self._formats = oas30_format_checker

    def schema_for(self, path: str, method: str, status: int) -> dict[str, Any]:
        responses = self.spec["paths"][path][method.lower()]["responses"]
        entry = responses.get(str(status)) or responses[f"{str(status)[0]}XX"]
        if "$ref" in entry:
            entry = self.spec["components"]["responses"][entry["$ref"].split("/")[-1]]
        content = entry["content"]
        return content["application/vnd.api+json"]["schema"]  # type: ignore[no-any-return]

    def errors(self, body: Any, path: str, method: str, status: int) -> list[str]:
        schema = self.schema_for(path, method, status)
        doc = {"components": self.spec["components"], **schema}
        validator = self._cls(doc, format_checker=self._formats)
        return [f"{list(e.path)}: {e.message[:300]}" for e in validator.iter_errors(body)]

    def check(self, body: Any, path: str, method: str, status: int) -> None:
        problems = self.errors(body, path, method, status)
        assert not problems, problems[:5]


@pytest.fixture(scope="session")
def schema(spec: dict[str, Any]) -> SchemaChecker:
    return SchemaChecker(spec)
