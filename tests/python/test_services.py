"""The product's services with the providers' official Python SDKs: a service token (`kws_…`,
scope `ai:call`) is the SDK's API key, in the SDK's own header, exactly where a user token
goes. The product feature travels in the base URL (`…/features/{feature}/providers/…`),
since an SDK cannot set a header per call; the acting user may ride in the SDK's default
headers (`keyward-on-behalf-of`). Every call is checked in the audit log: actor
`service:<name>`, `feature`, `on_behalf_of`.
"""

from __future__ import annotations

import secrets
from typing import Any

import anthropic
import openai
import pytest
from google import genai
from google.genai import types as genai_types

from conftest import Accounts, Fakes, Keyward

PROMPT = "Say hello to the test"
TIMEOUT_S = 30


def reply(provider: str) -> str:
    return f"Hello from fake {provider}."


@pytest.fixture(scope="module")
def service(keyward: Keyward) -> tuple[str, str]:
    """A service allowed to call AI and read audit logs: (name, token)."""
    name = "sdk-" + secrets.token_hex(4)
    out = keyward.cli("admin", "create-service", "--name", name, "--scope", "ai:call", "--scope", "audit:read")
    assert out and out["token"].startswith("kws_"), f"create-service printed {out}"
    return name, out["token"]


@pytest.fixture(scope="module")
def member(keyward: Keyward, accounts: Accounts) -> str:
    """A member of the own-key account, known to the product by its own id: the user id."""
    email = f"member-{secrets.token_hex(4)}@example.com"
    out = keyward.cli("admin", "create-user", "--email", email)
    keyward.cli("admin", "add-member", "--account", accounts.own, "--email", email, "--role", "member")
    return out["user_id"]


def base(kw: Keyward, account: str, provider: str, feature: str | None) -> str:
    if feature is None:
        return kw.provider_base(account, provider)
    return f"{kw.base_url}/v1/accounts/{account}/features/{feature}/providers/{provider}"


def last_ai_event(kw: Keyward, account: str, token: str) -> dict[str, Any]:
    r = kw.api("GET", f"/v1/accounts/{account}/audit?limit=20", token=token)
    assert r.status == 200, f"GET audit with the service token: {r}"
    events = [e for e in r.json()["events"] if e["action"] == "ai.request"]
    assert events, f"no ai.request event: {r.text}"
    return events[0]


def assert_audited(kw: Keyward, account: str, svc: tuple[str, str], provider: str, feature, on_behalf_of, key: str):
    e = last_ai_event(kw, account, svc[1])
    want = {
        "actor": f"service:{svc[0]}",
        "provider": provider,
        "feature": feature,
        "on_behalf_of": on_behalf_of,
        "key_source": "own",
        "key_last4": key[-4:],
        "outcome": "ok",
    }
    got = {k: e.get(k) for k in want}
    assert got == want, f"last ai.request audit event: {e}"


def assert_token_stayed(fake: Fakes, token: str) -> None:
    secret = token.split("_", 1)[-1]
    for r in fake.requests():
        whole = repr(r)
        assert token not in whole and secret not in whole, f"the service token reached the fake: {r}"


@pytest.mark.parametrize("feature", [None, "drafting"])
def test_openai_sdk_with_a_service_token(keyward: Keyward, accounts: Accounts, fake: Fakes, service, member, feature):
    c = openai.OpenAI(
        base_url=base(keyward, accounts.own, "openai", feature) + "/v1",
        api_key=service[1],
        default_headers={"keyward-on-behalf-of": member},
        max_retries=0,
        timeout=TIMEOUT_S,
    )
    resp = c.chat.completions.create(
        model="gpt-6-luna", messages=[{"role": "user", "content": PROMPT}], max_tokens=20
    )
    assert resp.choices[0].message.content == reply("openai")
    assert_audited(keyward, accounts.own, service, "openai", feature, member, accounts.own_keys["openai"])
    # Streamed, through the Responses API.
    events = list(c.responses.create(model="gpt-6-luna", input=PROMPT, max_output_tokens=20, stream=True))
    text = "".join(ev.delta for ev in events if ev.type == "response.output_text.delta")
    assert text == reply("openai")
    assert_audited(keyward, accounts.own, service, "openai", feature, member, accounts.own_keys["openai"])
    assert_token_stayed(fake, service[1])


@pytest.mark.parametrize("feature", [None, "autopilot"])
def test_anthropic_sdk_with_a_service_token(keyward: Keyward, accounts: Accounts, fake: Fakes, service, feature):
    c = anthropic.Anthropic(
        base_url=base(keyward, accounts.own, "anthropic", feature),
        api_key=service[1],
        max_retries=0,
        timeout=TIMEOUT_S,
    )
    msg = c.messages.create(
        model="claude-haiku-5-5", max_tokens=20, messages=[{"role": "user", "content": PROMPT}]
    )
    assert msg.content[0].text == reply("anthropic")
    assert_audited(keyward, accounts.own, service, "anthropic", feature, None, accounts.own_keys["anthropic"])
    with c.messages.stream(
        model="claude-haiku-5-5", max_tokens=20, messages=[{"role": "user", "content": PROMPT}]
    ) as s:
        text = "".join(s.text_stream)
    assert text == reply("anthropic")
    assert_audited(keyward, accounts.own, service, "anthropic", feature, None, accounts.own_keys["anthropic"])
    assert_token_stayed(fake, service[1])


@pytest.mark.parametrize("feature", [None, "triage"])
def test_google_genai_sdk_with_a_service_token(keyward: Keyward, accounts: Accounts, fake: Fakes, service, member, feature):
    c = genai.Client(
        api_key=service[1],
        http_options=genai_types.HttpOptions(
            base_url=base(keyward, accounts.own, "google", feature),
            headers={"keyward-on-behalf-of": member},
            timeout=TIMEOUT_S * 1000,
            retry_options=genai_types.HttpRetryOptions(attempts=1),
        ),
    )
    cfg = genai_types.GenerateContentConfig(max_output_tokens=20)
    resp = c.models.generate_content(model="gemini-3.8-flash", contents=PROMPT, config=cfg)
    assert resp.text == reply("google")
    assert_audited(keyward, accounts.own, service, "google", feature, member, accounts.own_keys["google"])
    text = "".join(ch.text or "" for ch in c.models.generate_content_stream(model="gemini-3.8-flash", contents=PROMPT, config=cfg))
    assert text == reply("google")
    assert_audited(keyward, accounts.own, service, "google", feature, member, accounts.own_keys["google"])
    assert_token_stayed(fake, service[1])


def test_each_sdk_raises_its_own_error_without_the_scope_and_after_revocation(keyward: Keyward, accounts: Accounts):
    name = "sdk-audit-" + secrets.token_hex(4)
    token = keyward.cli("admin", "create-service", "--name", name, "--scope", "audit:read")["token"]
    oa = openai.OpenAI(base_url=base(keyward, accounts.own, "openai", None) + "/v1", api_key=token, max_retries=0)
    with pytest.raises(openai.PermissionDeniedError) as e:
        oa.chat.completions.create(model="gpt-6-luna", messages=[{"role": "user", "content": PROMPT}], max_tokens=5)
    assert "ai:call" in str(e.value)
    an = anthropic.Anthropic(base_url=base(keyward, accounts.own, "anthropic", None), api_key=token, max_retries=0)
    with pytest.raises(anthropic.PermissionDeniedError):
        an.messages.create(model="claude-haiku-5-5", max_tokens=5, messages=[{"role": "user", "content": PROMPT}])
    # A bad feature in the base URL: the SDK's own bad-request error.
    name2 = "sdk-call-" + secrets.token_hex(4)
    caller = keyward.cli("admin", "create-service", "--name", name2, "--scope", "ai:call")["token"]
    bad = openai.OpenAI(
        base_url=f"{keyward.base_url}/v1/accounts/{accounts.own}/features/{'x' * 65}/providers/openai/v1",
        api_key=caller,
        max_retries=0,
    )
    with pytest.raises(openai.UnprocessableEntityError):
        bad.chat.completions.create(model="gpt-6-luna", messages=[{"role": "user", "content": PROMPT}], max_tokens=5)
    # Revoked: refused at once, as an authentication error.
    keyward.cli("admin", "revoke-service", "--name", name2)
    ok = openai.OpenAI(base_url=base(keyward, accounts.own, "openai", None) + "/v1", api_key=caller, max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        ok.chat.completions.create(model="gpt-6-luna", messages=[{"role": "user", "content": PROMPT}], max_tokens=5)
