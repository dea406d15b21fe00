"""Schemathesis hooks for the Stagepass fuzzing run (scripts/ci/fuzz.sh).

A JSON Schema cannot say four of the API's rules, so schema-valid
("positive") cases that break them are refused with 400 and would count as
"valid data rejected" although the document states each rule in prose:

- a class starts in the future (`starts_at`);
- its `time_zone` is one the database knows (`Ro/+GI0k7PAqU` fits the
  pattern of an IANA name, but no such zone exists; the list is the
  database's tzdata, not something the document can enumerate);
- the schedule's `to` is after `from`, at most 62 days later;
- a `cursor` is one the server handed out (`next_cursor`), opaque.

And one outcome a check cannot foresee: on a rate-limited route the limiter
runs first, so a request missing a required header may be answered 429
(documented there, with Retry-After and RateLimit headers, all checked by
the other checks) before the header is looked at. `filter_failure` drops
exactly that failure, and only for a well-formed `rate_limited` problem.

Only positive components are touched; negative cases go out as generated.
The examples phase runs without hooks: the document's `examples` (a
`starts_at` in 2099) cover it.
"""

from datetime import datetime, timedelta, timezone

import schemathesis
from schemathesis.core.parameters import ParameterLocation


def _positive(case, location):
    meta = case.meta
    if meta is None:
        return False
    info = meta.components.get(location)
    mode = info.mode if info is not None else meta.generation.mode
    return not mode.is_negative


def _iso(t):
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


@schemathesis.hook
def map_case(context, case):
    path = case.operation.path
    method = case.method.upper()
    now = datetime.now(timezone.utc)
    if path in ("/api/v1/classes", "/api/v1/classes/{id}") and method in ("POST", "PATCH"):
        if _positive(case, ParameterLocation.BODY) and isinstance(case.body, dict):
            if "starts_at" in case.body and case.body["starts_at"] is not None:
                case.body["starts_at"] = _iso(now + timedelta(days=2))
            if case.body.get("time_zone") is not None:
                zones = ("UTC", "Europe/Berlin", "America/New_York", "Asia/Tokyo")
                case.body["time_zone"] = zones[len(str(case.body["time_zone"])) % len(zones)]
    if path == "/api/v1/schedule" and method == "GET":
        if _positive(case, ParameterLocation.QUERY) and isinstance(case.query, dict):
            case.query["from"] = _iso(now - timedelta(days=1))
            case.query["to"] = _iso(now + timedelta(days=30))
    if path == "/api/v1/classes" and method == "GET":
        if _positive(case, ParameterLocation.QUERY) and isinstance(case.query, dict):
            case.query.pop("cursor", None)
    return case


@schemathesis.hook
def filter_failure(context, failure, case, response):
    """Keep every failure but "missing required header" answered by a 429."""
    if type(failure).__name__ != "MissingHeaderNotRejected" or response.status_code != 429:
        return True
    try:
        problem = response.json()
    except ValueError:
        return True
    rate_limited = (
        response.headers.get("content-type", [""])[0] == "application/problem+json"
        and isinstance(problem, dict)
        and problem.get("code") == "rate_limited"
        and "retry-after" in response.headers
    )
    return not rate_limited
