"""A bounded schemathesis run over the service's own OpenAPI document, against a real process.

Every operation gets generated requests, valid and invalid; every answer must be a documented status with
a body matching its schema, and never a 5xx; invalid requests must be refused. `positive_data_acceptance`
is left out on purpose: a schema-valid upload is any bytes, and random bytes are rightly a 400 bad_image.

The run is capped twice: 100 examples per operation and mode, and a wall-clock budget after which the
remaining examples are skipped (the test then says how far it got). schemathesis's own pytest plugin
(`from_fixture`) does not run under pytest 9, so the cases are drawn with its Hypothesis strategies.
"""

import time
from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.live import LiveService, live_service

pytestmark = [pytest.mark.data, pytest.mark.fuzz]


def invalid_data_refused(ctx, response, case):
    """schemathesis's negative_data_rejection, with 413 among the refusals: too many files is a 413
    `too_many_files` by this API's contract (Payload Too Large), which schemathesis does not list."""
    if response.status_code == 413:
        return None
    return negative_data_rejection(ctx, response, case)


CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    invalid_data_refused,
]
BUDGET_S = 120.0  # the whole run; on this 2-core machine it takes well under a minute


@pytest.fixture(scope="module")
def service() -> Iterator[LiveService]:
    with live_service({"GUARD_MAX_FILES": "8"}) as svc:
        yield svc


def run_examples(operation, mode: GenerationMode, deadline: float, calls: dict[str, int]) -> None:
    label = f"{operation.label} ({mode.value})"

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=100,
        deadline=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
        database=None,
    )
    def check(case) -> None:
        if time.monotonic() > deadline:
            return
        case.call_and_validate(checks=CHECKS, timeout=30)
        calls[label] = calls.get(label, 0) + 1

    try:
        check()
    except Unsatisfiable:
        # An operation with no parameters and no body (GET /v2/health/live) has no invalid request to make.
        assert mode == GenerationMode.NEGATIVE, label


def test_every_operation_answers_as_documented(service: LiveService) -> None:
    schema = schemathesis.openapi.from_url(f"{service.url}/openapi.json")
    deadline = time.monotonic() + BUDGET_S
    calls: dict[str, int] = {}
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            run_examples(operation, mode, deadline, calls)
    print(f"schemathesis: {sum(calls.values())} calls: {calls}")
    assert any("POST /classify" in label for label in calls), calls
    assert sum(calls.values()) >= 50, f"the time budget ran out early: {calls}"
