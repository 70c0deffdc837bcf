"""A faithful, dependency-free Klaviyo API simulator for segments, segment profiles, tags,
profiles and segment reports.

Serves an in-memory ``Account`` over HTTP on 127.0.0.1 with Klaviyo's envelopes, cursors,
filters, errors, auth, revision handling, rate limits and injectable faults.
"""

from .account import Account
from .generator import generate_account
from .server import KlaviyoSimulator, RequestRecord
from .spec_tables import ALL_SCOPES

__all__ = ["ALL_SCOPES", "Account", "KlaviyoSimulator", "RequestRecord", "generate_account"]
