"""keyward's own JSON API against its OpenAPI document (`GET /openapi.json`), fuzzed with
schemathesis: a bounded run (200 examples per operation) with an authenticated token,
where no answer may be a 5xx and every answer must match its documented status, schema and
content type.

The key-management, usage and audit operations are pointed at a real account of their own
(so bodies are judged, keys saved and removed, sources switched), the others keep the
generated account id (judged as a non-member). The AI operations (`ai/messages`, Test key,
the native pass-through) reach the fake providers with whatever key is saved, and a
provider's refusal is rightly a `502 provider_error` (or, through the pass-through, the
provider's own status): they keep generated ids so they exercise auth and input checks
without calling providers.
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

CALLS_PROVIDERS = ("/ai/messages", "/test")


def calls_providers(path: str) -> bool:
    """Operations that would reach the fake providers with a member's account: they keep
    the generated account id (a non-member's 404), since a provider's own answers are
    passed through and not keyward's to document."""
    return path.endswith(CALLS_PROVIDERS) or "/providers/" in path


@pytest.fixture(scope="session")
def fuzz_account(keyward) -> str:
    return keyward.create_account("Fuzzed")


@pytest.fixture(scope="session")
def provisioning_token(keyward) -> str:
    """A service token with accounts:manage: the provisioning operations (`/v1/external/…`)
    are fuzzed with it, so their bodies are judged (a user's token only gets 403)."""
    out = keyward.cli("admin", "create-service", "--name", "fuzz-provisioning", "--scope", "accounts:manage")
    return out["token"]




def test_the_document_is_openapi_3_1_and_lists_the_api(keyward):
    import json
    import urllib.request

    with urllib.request.urlopen(keyward.base_url + "/openapi.json") as r:
        doc = json.load(r)
    assert doc["openapi"].startswith("3.1")
    paths = doc["paths"]
    for path in (
        "/v1/me",
        "/v1/accounts/{account_id}/model-keys",
        "/v1/accounts/{account_id}/model-keys/{provider}",
        "/v1/accounts/{account_id}/model-keys/{provider}/source",
        "/v1/accounts/{account_id}/model-keys/{provider}/test",
        "/v1/accounts/{account_id}/ai/messages",
        "/v1/accounts/{account_id}/usage",
        "/v1/accounts/{account_id}/audit",
        "/v1/external/accounts/{external_id}",
        "/v1/external/users/{external_id}",
        "/v1/external/accounts/{external_id}/members/{user_external_id}",
    ):
        assert path in paths, f"{path} is not documented"


def test_api_answers_as_documented(keyward, fuzz_account, provisioning_token):
    schema = schemathesis.openapi.from_url(keyward.base_url + "/openapi.json")
    checks = [not_a_server_error, response_schema_conformance, status_code_conformance, content_type_conformance]
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 10, f"only {len(operations)} operations documented"
    calls = {"n": 0}
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def fuzz(case):
            params = case.path_parameters or {}
            if "account_id" in params and not calls_providers(case.path):
                params["account_id"] = fuzz_account
            token = provisioning_token if case.path.startswith("/v1/external/") else keyward.token
            case.call_and_validate(
                base_url=keyward.base_url,
                headers={"authorization": f"Bearer {token}"},
                checks=checks,
            )
            calls["n"] += 1

        fuzz()
    print(f"schemathesis: {len(operations)} operations, {calls['n']} requests")
