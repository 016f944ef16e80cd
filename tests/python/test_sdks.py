"""The providers' official Python SDKs against keyward's native pass-through.

Each SDK is used unchanged: its base URL is `…/v1/accounts/{id}/providers/{provider}` (plus
the SDK's own version segment where it expects one in the base URL) and its API key is the
keyward token. Every call goes through the real `keyward serve` to `keyward-fakes`, and the
fake's record of requests is checked: the provider's header carried the account's real key
(own or shared) and the keyward token appears nowhere.

The fakes answer "Hello from fake {provider}." (four words, one stream chunk per word) and
count words as tokens.
"""

from __future__ import annotations

import json
import time
from typing import Any

import anthropic
import openai
import pytest
from google import genai
from google.genai import errors as genai_errors
from google.genai import types as genai_types

from conftest import PROVIDERS, Accounts, Fakes, Keyward, random_key

PROMPT = "Say hello to the test"
PROMPT_WORDS = 5
MAX_TOKENS = 50
TIMEOUT_S = 30
# Slow streams: the fake's pause between chunks, and how late a relayed piece may be.
SLOW_DELAY_S = 0.5

# Where each provider wants its key.
KEY_HEADER = {"anthropic": "x-api-key", "openai": "authorization", "google": "x-goog-api-key"}
AUTH_HEADERS = ("x-api-key", "authorization", "x-goog-api-key", "proxy-authorization", "api-key")


def reply(provider: str) -> str:
    return f"Hello from fake {provider}."


# --------------------------------------------------------------------------- clients


def openai_client(kw: Keyward, account: str, token: str | None = None) -> openai.OpenAI:
    # The OpenAI SDK's base URL carries the version: requests go to {base}/chat/completions.
    return openai.OpenAI(
        base_url=kw.provider_base(account, "openai") + "/v1",
        api_key=token or kw.token,
        max_retries=0,
        timeout=TIMEOUT_S,
    )


def anthropic_client(kw: Keyward, account: str, token: str | None = None) -> anthropic.Anthropic:
    # The Anthropic SDK adds /v1/messages itself.
    return anthropic.Anthropic(
        base_url=kw.provider_base(account, "anthropic"),
        api_key=token or kw.token,
        max_retries=0,
        timeout=TIMEOUT_S,
    )


def google_client(kw: Keyward, account: str, token: str | None = None) -> genai.Client:
    # google-genai joins {base_url}/{api_version}/models/{model}:generateContent.
    return genai.Client(
        api_key=token or kw.token,
        http_options=genai_types.HttpOptions(
            base_url=kw.provider_base(account, "google"),
            api_version="v1beta",
            timeout=TIMEOUT_S * 1000,
            retry_options=genai_types.HttpRetryOptions(attempts=1),
        ),
    )


def google_config(**extra: Any) -> genai_types.GenerateContentConfig:
    return genai_types.GenerateContentConfig(max_output_tokens=MAX_TOKENS, **extra)


# --------------------------------------------------------------------------- what the fake saw


def dump(req: dict[str, Any]) -> str:
    return json.dumps(req, indent=1)


def assert_fake_saw(
    fake: Fakes,
    kw: Keyward,
    provider: str,
    key: str | None,
    *,
    calls: int,
    path: str | None = None,
) -> list[dict[str, Any]]:
    """The fake received `calls` requests, each with `key` in the provider's header and
    nowhere else, and the keyward token nowhere at all."""
    reqs = fake.requests()
    token = kw.token
    secret = token.split("_", 1)[-1]
    problems: list[str] = []
    if len(reqs) != calls:
        problems.append(f"expected {calls} request(s) at the fake, got {len(reqs)}")
    for r in reqs:
        whole = json.dumps(r)
        if token in whole or secret in whole:
            problems.append(f"the keyward token reached the fake: {r['method']} {r['path']}")
        if path is not None and r["path"] != path:
            problems.append(f"path {r['path']!r}, expected {path!r}")
        headers = {k.lower(): v for k, v in r["headers"].items()}
        if key is not None:
            expected = f"Bearer {key}" if provider == "openai" else key
            got = headers.get(KEY_HEADER[provider])
            if got != expected:
                problems.append(f"{KEY_HEADER[provider]}: {got!r}, expected the real key {expected!r}")
            for name, value in headers.items():
                if key in value and name != KEY_HEADER[provider]:
                    problems.append(f"the real key also travelled in header {name!r}")
            for part in ("path", "query", "body"):
                if key in (r.get(part) or ""):
                    problems.append(f"the real key travelled in the {part}")
        for name in AUTH_HEADERS:
            if name != KEY_HEADER[provider] and name in headers:
                problems.append(f"an extra credential header {name}: {headers[name]!r} was forwarded")
    assert not problems, "\n".join(problems) + "\n--- requests the fake saw:\n" + "\n".join(dump(r) for r in reqs)
    return reqs


def last_ai_event(kw: Keyward, account: str) -> dict[str, Any]:
    r = kw.api("GET", f"/v1/accounts/{account}/audit?limit=20")
    assert r.status == 200, f"GET audit: {r}"
    events = [e for e in r.json()["events"] if e["action"] == "ai.request"]
    assert events, f"no ai.request event: {r.text}"
    return events[0]


def assert_audited(kw: Keyward, account: str, provider: str, source: str, key: str, model: str, outcome: str = "ok"):
    e = last_ai_event(kw, account)
    want = {"provider": provider, "key_source": source, "model": model, "outcome": outcome}
    if source == "own":
        # The spec: an own-key ai.request always carries key_last4 (a shared one need not).
        want["key_last4"] = key[-4:]
    got = {k: e.get(k) for k in want}
    assert got == want, f"last ai.request audit event: {e}"


def first_model(kw: Keyward, account: str, provider: str) -> str:
    models = kw.models(account, provider)
    assert models, f"no {provider} models in the catalogue"
    return models[0]


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def slow_account(keyward: Keyward) -> tuple[str, dict[str, str]]:
    """An account whose own keys stream slowly (SLOW_DELAY_S between chunks at the fake)."""
    account = keyward.create_account("SDK slow streams")
    keys = {p: random_key(p, "slow") for p in PROVIDERS}
    for p in PROVIDERS:
        keyward.fakes.set_key(keys[p], "slow_stream", p, delay_ms=int(SLOW_DELAY_S * 1000))
        keyward.save_own_key(account, p, keys[p])
    return account, keys


def quota_account(kw: Keyward, provider: str) -> str:
    """A fresh pro account on the shared pool for `provider`, with a generous limit."""
    account = kw.create_account(f"SDK quota {provider}")
    r = kw.api("GET", f"/v1/accounts/{account}/model-keys")
    assert r.status == 200, r
    source = {p["provider"]: p["source"] for p in r.json()["providers"]}
    assert source[provider] == "shared", f"a new account should use the shared pool: {r.text}"
    kw.set_limit(account, 1_000_000)
    return account


def exhaust(kw: Keyward, account: str) -> None:
    """Sets the limit to what is already used: the next shared call cannot be covered."""
    used = kw.usage(account)["shared"]["credits_used"]
    assert used >= 1, f"a shared call is charged against the plan's credits: used {used}"
    kw.set_limit(account, used)
    u = kw.usage(account)["shared"]
    assert u["credits_remaining"] == 0, f"usage after set-plan: {u}"


# =========================================================================== OpenAI


class TestOpenAI:
    P = "openai"

    def test_plain_call(self, keyward: Keyward, accounts: Accounts, fake: Fakes):
        model = first_model(keyward, accounts.own, self.P)
        c = openai_client(keyward, accounts.own)
        resp = c.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": PROMPT}],
            max_completion_tokens=MAX_TOKENS,
        )
        assert resp.choices[0].message.content == reply(self.P)
        assert resp.choices[0].finish_reason == "stop"
        assert resp.model == model
        assert (resp.usage.prompt_tokens, resp.usage.completion_tokens) == (PROMPT_WORDS, 4)
        assert (resp._request_id or "").startswith("req_"), "the provider's x-request-id should be passed back"
        (req,) = assert_fake_saw(
            fake, keyward, self.P, accounts.own_keys[self.P], calls=1, path="/v1/chat/completions"
        )
        sent = json.loads(req["body"])
        assert sent["model"] == model and sent["messages"] == [{"role": "user", "content": PROMPT}], sent
        assert_audited(keyward, accounts.own, self.P, "own", accounts.own_keys[self.P], model)

    def test_streamed_call_without_usage_asked(self, keyward: Keyward, accounts: Accounts, fake: Fakes):
        model = first_model(keyward, accounts.own, self.P)
        c = openai_client(keyward, accounts.own)
        chunks = list(
            c.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": PROMPT}],
                max_completion_tokens=MAX_TOKENS,
                stream=True,
            )
        )
        pieces = [ch.choices[0].delta.content for ch in chunks if ch.choices and ch.choices[0].delta.content]
        assert len(pieces) >= 2, f"text should arrive in several pieces: {pieces}"
        assert "".join(pieces) == reply(self.P)
        assert any(ch.choices and ch.choices[0].finish_reason == "stop" for ch in chunks)
        # The client did not ask for usage: no usage-only chunk, no usage anywhere.
        usage_only = [ch.model_dump() for ch in chunks if not ch.choices]
        assert not usage_only, f"a usage-only chunk reached a client that did not ask for it: {usage_only}"
        with_usage = [ch.model_dump() for ch in chunks if ch.usage is not None]
        assert not with_usage, f"chunks carry usage the client did not ask for: {with_usage}"
        (req,) = assert_fake_saw(
            fake, keyward, self.P, accounts.own_keys[self.P], calls=1, path="/v1/chat/completions"
        )
        # keyward asked the provider for the usage (for metering) on the client's behalf.
        sent = json.loads(req["body"])
        assert sent.get("stream_options", {}).get("include_usage") is True, sent
        e = last_ai_event(keyward, accounts.own)
        assert (e["input_tokens"], e["output_tokens"], e["outcome"]) == (PROMPT_WORDS, 4, "ok"), e

    def test_streamed_call_with_usage_asked(self, keyward: Keyward, accounts: Accounts, fake: Fakes):
        model = first_model(keyward, accounts.own, self.P)
        c = openai_client(keyward, accounts.own)
        chunks = list(
            c.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": PROMPT}],
                max_completion_tokens=MAX_TOKENS,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        pieces = [ch.choices[0].delta.content for ch in chunks if ch.choices and ch.choices[0].delta.content]
        assert "".join(pieces) == reply(self.P) and len(pieces) >= 2, pieces
        last = chunks[-1]
        assert last.choices == [] and last.usage is not None, f"the usage chunk the client asked for: {last}"
        assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (PROMPT_WORDS, 4)
        assert_fake_saw(fake, keyward, self.P, accounts.own_keys[self.P], calls=1)

    def test_stream_is_relayed_as_it_arrives(self, keyward: Keyward, slow_account, fake: Fakes):
        account, keys = slow_account
        model = first_model(keyward, account, self.P)
        c = openai_client(keyward, account)
        started = time.monotonic()
        arrivals = []
        for ch in c.chat.completions.create(
            model=model, messages=[{"role": "user", "content": PROMPT}], max_completion_tokens=MAX_TOKENS, stream=True
        ):
            if ch.choices and ch.choices[0].delta.content:
                arrivals.append((time.monotonic() - started, ch.choices[0].delta.content))
        assert "".join(t for _, t in arrivals) == reply(self.P)
        # The fake's chunks: the role chunk, then one per word.
        assert_relayed_as_sent(arrivals, first_chunk=1)
        assert_fake_saw(fake, keyward, self.P, keys[self.P], calls=1)

    @pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
    def test_bad_key_raises_authentication_error(self, keyward: Keyward, accounts: Accounts, fake: Fakes, stream):
        key = accounts.bad_keys[self.P]
        c = openai_client(keyward, accounts.bad)
        with pytest.raises(openai.AuthenticationError) as info:
            out = c.chat.completions.create(
                model=first_model(keyward, accounts.bad, self.P),
                messages=[{"role": "user", "content": PROMPT}],
                max_completion_tokens=MAX_TOKENS,
                stream=stream,
            )
            if stream:
                list(out)
        e = info.value
        assert e.status_code == 401
        assert e.code == "invalid_api_key", e.body
        assert e.body["message"].startswith("Incorrect API key provided: "), e.body
        assert "platform.openai.com/account/api-keys" in e.body["message"], e.body
        assert key not in str(e) and key not in e.response.text
        assert_fake_saw(fake, keyward, self.P, key, calls=1)

    def test_echoed_key_is_removed_from_the_error(self, keyward: Keyward, accounts: Accounts, fake: Fakes):
        key = accounts.echo_keys[self.P]
        c = openai_client(keyward, accounts.echo)
        with pytest.raises(openai.AuthenticationError) as info:
            c.chat.completions.create(
                model=first_model(keyward, accounts.echo, self.P),
                messages=[{"role": "user", "content": PROMPT}],
                max_completion_tokens=MAX_TOKENS,
            )
        e = info.value
        assert e.body["message"].startswith("Incorrect API key provided: "), e.body
        assert key not in e.response.text and key[:-4] not in e.response.text, e.response.text
        assert_fake_saw(fake, keyward, self.P, key, calls=1)

    def test_wrong_keyward_token_is_refused_in_openai_envelope(self, keyward: Keyward, accounts: Accounts, fake):
        c = openai_client(keyward, accounts.own, token="kw_" + "0" * 40)
        with pytest.raises(openai.AuthenticationError) as info:
            c.chat.completions.create(
                model=first_model(keyward, accounts.own, self.P),
                messages=[{"role": "user", "content": PROMPT}],
            )
        assert info.value.status_code == 401 and info.value.code == "invalid_api_key", info.value.body
        assert fake.requests() == []

    def test_shared_quota_exhausted_raises_rate_limit_error(self, keyward: Keyward, fake: Fakes):
        account = quota_account(keyward, self.P)
        model = first_model(keyward, account, self.P)
        c = openai_client(keyward, account)
        ok = c.chat.completions.create(
            model=model, messages=[{"role": "user", "content": PROMPT}], max_completion_tokens=MAX_TOKENS
        )
        assert ok.choices[0].message.content == reply(self.P)
        assert_fake_saw(fake, keyward, self.P, keyward.shared_keys[self.P], calls=1)
        assert_audited(keyward, account, self.P, "shared", keyward.shared_keys[self.P], model)
        exhaust(keyward, account)
        fake.clear()
        for stream in (False, True):
            with pytest.raises(openai.RateLimitError) as info:
                out = c.chat.completions.create(
                    model=model,
                    messages=[{"role": "user", "content": PROMPT}],
                    max_completion_tokens=MAX_TOKENS,
                    stream=stream,
                )
                if stream:
                    list(out)
            e = info.value
            assert e.status_code == 429
            assert e.code == "insufficient_quota", e.body
            assert "shared-pool credits" in e.body["message"], e.body
        assert fake.requests() == [], "a refused call must not reach the provider"

    def test_models_list(self, keyward: Keyward, accounts: Accounts, fake: Fakes):
        c = openai_client(keyward, accounts.own)
        ids = [m.id for m in c.models.list()]
        # Every chat model the account can name, and the embedding models.
        chat = keyward.models(accounts.own, self.P)
        assert ids[: len(chat)] == chat, ids
        assert "text-embedding-3-small" in ids, ids
        assert fake.requests() == [], "the listing is answered from keyward's catalogue"

    def test_responses_plain(self, keyward: Keyward, accounts: Accounts, fake: Fakes):
        model = first_model(keyward, accounts.own, self.P)
        c = openai_client(keyward, accounts.own)
        r = c.responses.create(model=model, input=PROMPT, max_output_tokens=MAX_TOKENS)
        assert r.output_text == reply(self.P)
        assert r.id.startswith("resp_") and r.status == "completed"
        assert (r.usage.input_tokens, r.usage.output_tokens) == (PROMPT_WORDS, 4)
        (req,) = assert_fake_saw(fake, keyward, self.P, accounts.own_keys[self.P], calls=1, path="/v1/responses")
        sent = json.loads(req["body"])
        assert sent["model"] == model and sent["max_output_tokens"] == MAX_TOKENS, sent
        assert_audited(keyward, accounts.own, self.P, "own", accounts.own_keys[self.P], model)
        e = last_ai_event(keyward, accounts.own)
        assert (e["input_tokens"], e["output_tokens"]) == (PROMPT_WORDS, 4), e

    def test_responses_streamed(self, keyward: Keyward, accounts: Accounts, fake: Fakes):
        model = first_model(keyward, accounts.own, self.P)
        c = openai_client(keyward, accounts.own)
        events = list(c.responses.create(model=model, input=PROMPT, max_output_tokens=MAX_TOKENS, stream=True))
        deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
        assert len(deltas) >= 2 and "".join(deltas) == reply(self.P), deltas
        assert events[-1].type == "response.completed", [e.type for e in events]
        assert events[-1].response.usage.output_tokens == 4
        (req,) = assert_fake_saw(fake, keyward, self.P, accounts.own_keys[self.P], calls=1, path="/v1/responses")
        assert json.loads(req["body"])["stream"] is True
        e = last_ai_event(keyward, accounts.own)
        assert (e["input_tokens"], e["output_tokens"], e["outcome"]) == (PROMPT_WORDS, 4, "ok"), e

    def test_responses_echoed_key_is_removed(self, keyward: Keyward, accounts: Accounts, fake: Fakes):
        key = accounts.echo_keys[self.P]
        c = openai_client(keyward, accounts.echo)
        with pytest.raises(openai.AuthenticationError) as info:
            c.responses.create(model=first_model(keyward, accounts.echo, self.P), input=PROMPT)
        text = info.value.response.text
        assert key not in text and key[:-4] not in text, text
        assert_fake_saw(fake, keyward, self.P, key, calls=1)

    def test_embeddings(self, keyward: Keyward, accounts: Accounts, fake: Fakes):
        c = openai_client(keyward, accounts.own)
        r = c.embeddings.create(model="text-embedding-3-small", input=PROMPT)
        assert len(r.data) == 1 and len(r.data[0].embedding) > 0
        assert all(isinstance(x, float) for x in r.data[0].embedding)
        assert r.usage.prompt_tokens == PROMPT_WORDS
        assert_fake_saw(fake, keyward, self.P, accounts.own_keys[self.P], calls=1, path="/v1/embeddings")
        assert_audited(keyward, accounts.own, self.P, "own", accounts.own_keys[self.P], "text-embedding-3-small")
        e = last_ai_event(keyward, accounts.own)
        assert (e["input_tokens"], e["output_tokens"]) == (PROMPT_WORDS, 0), e

    def test_an_endpoint_not_carried_is_refused_in_openai_format(self, keyward: Keyward, accounts: Accounts, fake):
        c = openai_client(keyward, accounts.own)
        with pytest.raises(openai.NotFoundError) as info:
            c.images.generate(model="gpt-image-1", prompt="a cat")
        msg = info.value.body["message"]
        assert "/v1/responses" in msg and "/v1/embeddings" in msg, info.value.body
        assert fake.requests() == []


# =========================================================================== Anthropic


class TestAnthropic:
    P = "anthropic"

    def test_plain_call(self, keyward: Keyward, accounts: Accounts, fake: Fakes):
        model = first_model(keyward, accounts.own, self.P)
        c = anthropic_client(keyward, accounts.own)
        msg = c.messages.create(model=model, max_tokens=MAX_TOKENS, messages=[{"role": "user", "content": PROMPT}])
        assert [b.type for b in msg.content] == ["text"]
        assert msg.content[0].text == reply(self.P)
        assert msg.stop_reason == "end_turn" and msg.model == model
        assert (msg.usage.input_tokens, msg.usage.output_tokens) == (PROMPT_WORDS, 4)
        assert (msg._request_id or "").startswith("req_"), "the provider's request-id should be passed back"
        (req,) = assert_fake_saw(fake, keyward, self.P, accounts.own_keys[self.P], calls=1, path="/v1/messages")
        assert req["headers"].get("anthropic-version"), "the SDK's anthropic-version should be forwarded"
        sent = json.loads(req["body"])
        assert sent["model"] == model and sent["max_tokens"] == MAX_TOKENS, sent
        assert_audited(keyward, accounts.own, self.P, "own", accounts.own_keys[self.P], model)

    def test_streamed_call(self, keyward: Keyward, accounts: Accounts, fake: Fakes):
        model = first_model(keyward, accounts.own, self.P)
        c = anthropic_client(keyward, accounts.own)
        with c.messages.stream(
            model=model, max_tokens=MAX_TOKENS, messages=[{"role": "user", "content": PROMPT}]
        ) as s:
            pieces = list(s.text_stream)
            final = s.get_final_message()
        assert len(pieces) >= 2, f"text should arrive in several pieces: {pieces}"
        assert "".join(pieces) == reply(self.P)
        assert final.content[0].text == reply(self.P) and final.stop_reason == "end_turn"
        assert final.usage.output_tokens == 4
        assert_fake_saw(fake, keyward, self.P, accounts.own_keys[self.P], calls=1, path="/v1/messages")
        e = last_ai_event(keyward, accounts.own)
        assert (e["input_tokens"], e["output_tokens"], e["outcome"]) == (PROMPT_WORDS, 4, "ok"), e

    def test_stream_is_relayed_as_it_arrives(self, keyward: Keyward, slow_account, fake: Fakes):
        account, keys = slow_account
        model = first_model(keyward, account, self.P)
        c = anthropic_client(keyward, account)
        started = time.monotonic()
        arrivals = []
        with c.messages.stream(
            model=model, max_tokens=MAX_TOKENS, messages=[{"role": "user", "content": PROMPT}]
        ) as s:
            for text in s.text_stream:
                arrivals.append((time.monotonic() - started, text))
        assert "".join(t for _, t in arrivals) == reply(self.P)
        # The fake's chunks: message_start, content_block_start, ping, then one per word.
        assert_relayed_as_sent(arrivals, first_chunk=3)
        assert_fake_saw(fake, keyward, self.P, keys[self.P], calls=1)

    @pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
    def test_bad_key_raises_authentication_error(self, keyward: Keyward, accounts: Accounts, fake: Fakes, stream):
        key = accounts.bad_keys[self.P]
        c = anthropic_client(keyward, accounts.bad)
        model = first_model(keyward, accounts.bad, self.P)
        with pytest.raises(anthropic.AuthenticationError) as info:
            if stream:
                with c.messages.stream(
                    model=model, max_tokens=MAX_TOKENS, messages=[{"role": "user", "content": PROMPT}]
                ) as s:
                    list(s.text_stream)
            else:
                c.messages.create(model=model, max_tokens=MAX_TOKENS, messages=[{"role": "user", "content": PROMPT}])
        e = info.value
        assert e.status_code == 401
        assert e.body["error"] == {"type": "authentication_error", "message": "invalid x-api-key"}, e.body
        assert key not in e.response.text
        assert_fake_saw(fake, keyward, self.P, key, calls=1)

    def test_echoed_key_is_removed_from_the_error(self, keyward: Keyward, accounts: Accounts, fake: Fakes):
        key = accounts.echo_keys[self.P]
        c = anthropic_client(keyward, accounts.echo)
        with pytest.raises(anthropic.AuthenticationError) as info:
            c.messages.create(
                model=first_model(keyward, accounts.echo, self.P),
                max_tokens=MAX_TOKENS,
                messages=[{"role": "user", "content": PROMPT}],
            )
        e = info.value
        assert e.body["error"]["message"].startswith("invalid x-api-key"), e.body
        assert key not in e.response.text and key[:-4] not in e.response.text, e.response.text
        assert_fake_saw(fake, keyward, self.P, key, calls=1)

    def test_wrong_keyward_token_is_refused_in_anthropic_envelope(self, keyward: Keyward, accounts: Accounts, fake):
        c = anthropic_client(keyward, accounts.own, token="kw_" + "0" * 40)
        with pytest.raises(anthropic.AuthenticationError) as info:
            c.messages.create(
                model=first_model(keyward, accounts.own, self.P),
                max_tokens=MAX_TOKENS,
                messages=[{"role": "user", "content": PROMPT}],
            )
        assert info.value.status_code == 401
        assert info.value.body["type"] == "error", info.value.body
        assert info.value.body["error"]["type"] == "authentication_error", info.value.body
        assert fake.requests() == []

    def test_shared_quota_exhausted_raises_rate_limit_error(self, keyward: Keyward, fake: Fakes):
        account = quota_account(keyward, self.P)
        model = first_model(keyward, account, self.P)
        c = anthropic_client(keyward, account)
        ok = c.messages.create(model=model, max_tokens=MAX_TOKENS, messages=[{"role": "user", "content": PROMPT}])
        assert ok.content[0].text == reply(self.P)
        assert_fake_saw(fake, keyward, self.P, keyward.shared_keys[self.P], calls=1)
        assert_audited(keyward, account, self.P, "shared", keyward.shared_keys[self.P], model)
        exhaust(keyward, account)
        fake.clear()
        for stream in (False, True):
            with pytest.raises(anthropic.RateLimitError) as info:
                if stream:
                    with c.messages.stream(
                        model=model, max_tokens=MAX_TOKENS, messages=[{"role": "user", "content": PROMPT}]
                    ) as s:
                        list(s.text_stream)
                else:
                    c.messages.create(
                        model=model, max_tokens=MAX_TOKENS, messages=[{"role": "user", "content": PROMPT}]
                    )
            e = info.value
            assert e.status_code == 429
            assert e.body["error"]["type"] == "rate_limit_error", e.body
            assert "shared-pool credits" in e.body["error"]["message"], e.body
        assert fake.requests() == [], "a refused call must not reach the provider"

    def test_count_tokens(self, keyward: Keyward, accounts: Accounts, fake: Fakes):
        model = first_model(keyward, accounts.own, self.P)
        c = anthropic_client(keyward, accounts.own)
        r = c.messages.count_tokens(model=model, messages=[{"role": "user", "content": PROMPT}])
        assert r.input_tokens == PROMPT_WORDS
        (req,) = assert_fake_saw(
            fake, keyward, self.P, accounts.own_keys[self.P], calls=1, path="/v1/messages/count_tokens"
        )
        assert req["headers"].get("anthropic-version"), req
        assert_audited(keyward, accounts.own, self.P, "own", accounts.own_keys[self.P], model)

    def test_an_endpoint_not_carried_is_refused_in_anthropic_format(self, keyward: Keyward, accounts: Accounts, fake):
        c = anthropic_client(keyward, accounts.own)
        with pytest.raises(anthropic.NotFoundError) as info:
            c.messages.batches.list()
        body = info.value.body
        assert body["type"] == "error" and body["error"]["type"] == "not_found_error", body
        assert "/v1/messages/count_tokens" in body["error"]["message"], body
        assert fake.requests() == []

    def test_models_list(self, keyward: Keyward, accounts: Accounts, fake: Fakes):
        c = anthropic_client(keyward, accounts.own)
        models = list(c.models.list())
        assert [m.id for m in models] == keyward.models(accounts.own, self.P)
        assert all(m.type == "model" and m.display_name for m in models), models
        assert fake.requests() == [], "the listing is answered from keyward's catalogue"


# =========================================================================== Google


class TestGoogle:
    P = "google"

    def test_plain_call(self, keyward: Keyward, accounts: Accounts, fake: Fakes):
        model = first_model(keyward, accounts.own, self.P)
        c = google_client(keyward, accounts.own)
        resp = c.models.generate_content(model=model, contents=PROMPT, config=google_config())
        assert resp.text == reply(self.P)
        assert resp.candidates[0].finish_reason == genai_types.FinishReason.STOP
        assert resp.usage_metadata.prompt_token_count == PROMPT_WORDS
        assert resp.usage_metadata.candidates_token_count == 4
        (req,) = assert_fake_saw(
            fake,
            keyward,
            self.P,
            accounts.own_keys[self.P],
            calls=1,
            path=f"/v1beta/models/{model}:generateContent",
        )
        sent = json.loads(req["body"])
        assert sent["contents"][0]["parts"][0]["text"] == PROMPT, sent
        assert_audited(keyward, accounts.own, self.P, "own", accounts.own_keys[self.P], model)

    def test_streamed_call(self, keyward: Keyward, accounts: Accounts, fake: Fakes):
        model = first_model(keyward, accounts.own, self.P)
        c = google_client(keyward, accounts.own)
        chunks = list(c.models.generate_content_stream(model=model, contents=PROMPT, config=google_config()))
        pieces = [ch.text for ch in chunks if ch.text]
        assert len(pieces) >= 2, f"text should arrive in several pieces: {pieces}"
        assert "".join(pieces) == reply(self.P)
        assert chunks[-1].usage_metadata.candidates_token_count == 4
        (req,) = assert_fake_saw(
            fake,
            keyward,
            self.P,
            accounts.own_keys[self.P],
            calls=1,
            path=f"/v1beta/models/{model}:streamGenerateContent",
        )
        assert req["query"] == "alt=sse", req
        e = last_ai_event(keyward, accounts.own)
        assert (e["input_tokens"], e["output_tokens"], e["outcome"]) == (PROMPT_WORDS, 4, "ok"), e

    def test_stream_is_relayed_as_it_arrives(self, keyward: Keyward, slow_account, fake: Fakes):
        account, keys = slow_account
        model = first_model(keyward, account, self.P)
        c = google_client(keyward, account)
        started = time.monotonic()
        arrivals = []
        for ch in c.models.generate_content_stream(model=model, contents=PROMPT, config=google_config()):
            if ch.text:
                arrivals.append((time.monotonic() - started, ch.text))
        assert "".join(t for _, t in arrivals) == reply(self.P)
        # The fake's chunks: one per word.
        assert_relayed_as_sent(arrivals, first_chunk=0)
        assert_fake_saw(fake, keyward, self.P, keys[self.P], calls=1)

    @pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
    def test_bad_key_raises_client_error_api_key_invalid(
        self, keyward: Keyward, accounts: Accounts, fake: Fakes, stream
    ):
        key = accounts.bad_keys[self.P]
        c = google_client(keyward, accounts.bad)
        model = first_model(keyward, accounts.bad, self.P)
        with pytest.raises(genai_errors.ClientError) as info:
            if stream:
                list(c.models.generate_content_stream(model=model, contents=PROMPT, config=google_config()))
            else:
                c.models.generate_content(model=model, contents=PROMPT, config=google_config())
        e = info.value
        assert e.code == 400 and e.status == "INVALID_ARGUMENT", e.details
        assert e.message == "API key not valid. Please pass a valid API key.", e.details
        reasons = [d.get("reason") for d in e.details["error"].get("details", [])]
        assert "API_KEY_INVALID" in reasons, e.details
        assert key not in json.dumps(e.details)
        assert_fake_saw(fake, keyward, self.P, key, calls=1)

    def test_echoed_key_is_removed_from_the_error(self, keyward: Keyward, accounts: Accounts, fake: Fakes):
        key = accounts.echo_keys[self.P]
        c = google_client(keyward, accounts.echo)
        with pytest.raises(genai_errors.ClientError) as info:
            c.models.generate_content(
                model=first_model(keyward, accounts.echo, self.P), contents=PROMPT, config=google_config()
            )
        e = info.value
        assert e.code == 400 and e.message.startswith("API key not valid"), e.details
        text = json.dumps(e.details)
        assert key not in text and key[:-4] not in text, text
        assert_fake_saw(fake, keyward, self.P, key, calls=1)

    def test_wrong_keyward_token_is_refused_in_google_envelope(self, keyward: Keyward, accounts: Accounts, fake):
        c = google_client(keyward, accounts.own, token="kw_" + "0" * 40)
        with pytest.raises(genai_errors.ClientError) as info:
            c.models.generate_content(
                model=first_model(keyward, accounts.own, self.P), contents=PROMPT, config=google_config()
            )
        assert info.value.code == 401 and info.value.status == "UNAUTHENTICATED", info.value.details
        assert fake.requests() == []

    def test_shared_quota_exhausted_raises_429_resource_exhausted(self, keyward: Keyward, fake: Fakes):
        account = quota_account(keyward, self.P)
        model = first_model(keyward, account, self.P)
        c = google_client(keyward, account)
        ok = c.models.generate_content(model=model, contents=PROMPT, config=google_config())
        assert ok.text == reply(self.P)
        assert_fake_saw(fake, keyward, self.P, keyward.shared_keys[self.P], calls=1)
        assert_audited(keyward, account, self.P, "shared", keyward.shared_keys[self.P], model)
        exhaust(keyward, account)
        fake.clear()
        for stream in (False, True):
            with pytest.raises(genai_errors.ClientError) as info:
                if stream:
                    list(c.models.generate_content_stream(model=model, contents=PROMPT, config=google_config()))
                else:
                    c.models.generate_content(model=model, contents=PROMPT, config=google_config())
            e = info.value
            assert e.code == 429 and e.status == "RESOURCE_EXHAUSTED", e.details
            assert "shared-pool credits" in e.message, e.details
        assert fake.requests() == [], "a refused call must not reach the provider"

    @pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
    def test_default_settings_call_v1(self, keyward: Keyward, accounts: Accounts, fake: Fakes, stream):
        # google-genai 3.x with only a base URL and a key: it calls the v1 API.
        model = first_model(keyward, accounts.own, self.P)
        c = genai.Client(
            api_key=keyward.token,
            http_options=genai_types.HttpOptions(base_url=keyward.provider_base(accounts.own, self.P)),
        )
        if stream:
            text = "".join(ch.text or "" for ch in c.models.generate_content_stream(model=model, contents=PROMPT))
            path = f"/v1/models/{model}:streamGenerateContent"
        else:
            text = c.models.generate_content(model=model, contents=PROMPT).text
            path = f"/v1/models/{model}:generateContent"
        assert text == reply(self.P)
        (req,) = assert_fake_saw(fake, keyward, self.P, accounts.own_keys[self.P], calls=1, path=path)
        assert req["query"] == ("alt=sse" if stream else None), req
        e = last_ai_event(keyward, accounts.own)
        assert (e["model"], e["input_tokens"], e["outcome"]) == (model, PROMPT_WORDS, "ok"), e
        # Its model listing works with the same settings.
        assert [m.name for m in c.models.list()] == [f"models/{m}" for m in keyward.models(accounts.own, self.P)]

    def test_an_endpoint_not_carried_is_refused_in_google_format(self, keyward: Keyward, accounts: Accounts, fake):
        c = google_client(keyward, accounts.own)
        with pytest.raises(genai_errors.ClientError) as info:
            c.models.count_tokens(model=first_model(keyward, accounts.own, self.P), contents=PROMPT)
        e = info.value
        assert e.status in ("NOT_FOUND", "INVALID_ARGUMENT"), e.details
        assert "generateContent" in e.message, e.details
        assert fake.requests() == []

    def test_models_list(self, keyward: Keyward, accounts: Accounts, fake: Fakes):
        c = google_client(keyward, accounts.own)
        models = list(c.models.list())
        assert [m.name for m in models] == [f"models/{m}" for m in keyward.models(accounts.own, self.P)]
        assert fake.requests() == [], "the listing is answered from keyward's catalogue"


# =========================================================================== shared


def assert_relayed_as_sent(arrivals: list[tuple[float, str]], first_chunk: int) -> None:
    """The fake sends its stream chunk by chunk with SLOW_DELAY_S between chunks, one text
    piece per chunk (from chunk `first_chunk` on). Relayed as it arrives, the pieces reach the
    SDK spread out as they were sent: each at least half a pause after the one before. Held
    back and sent together, they would arrive at once. Gaps within one answer do not depend
    on how busy the machine is, as a deadline from the start would."""
    assert len(arrivals) >= 2, arrivals
    timeline = ", ".join(f"{t:.2f}s {x!r}" for t, x in arrivals)
    gaps = [later - earlier for (earlier, _), (later, _) in zip(arrivals, arrivals[1:])]
    bunched = [f"piece {i + 1} came {g:.2f}s after piece {i}" for i, g in enumerate(gaps) if g < SLOW_DELAY_S / 2]
    assert not bunched, (
        f"stream pieces (from chunk {first_chunk} on) reached the SDK together, not as they were sent:\n"
        + "\n".join(bunched)
        + f"\narrivals: {timeline}"
    )


# =========================================================================== metering


def test_every_endpoint_that_costs_money_is_metered_and_token_counting_is_free(keyward: Keyward, fake: Fakes):
    """On the shared pool: a Responses call and an embedding each cost credits (as the
    catalogue prices them); a token count is audited and costs nothing."""
    account = quota_account(keyward, "openai")
    c = openai_client(keyward, account)
    model = first_model(keyward, account, "openai")
    used = keyward.usage(account)["shared"]["credits_used"]
    c.responses.create(model=model, input=PROMPT, max_output_tokens=MAX_TOKENS)
    after_response = keyward.usage(account)["shared"]["credits_used"]
    assert after_response > used, "a Responses call is charged"
    assert_audited(keyward, account, "openai", "shared", keyward.shared_keys["openai"], model)
    c.embeddings.create(model="text-embedding-3-small", input=PROMPT)
    after_embedding = keyward.usage(account)["shared"]["credits_used"]
    assert after_embedding > after_response, "an embedding is charged"
    assert keyward.usage(account)["by_provider"]["openai"]["shared"]["requests"] == 2

    account = quota_account(keyward, "anthropic")
    a = anthropic_client(keyward, account)
    before = keyward.usage(account)
    r = a.messages.count_tokens(model=first_model(keyward, account, "anthropic"), messages=[{"role": "user", "content": PROMPT}])
    assert r.input_tokens == PROMPT_WORDS
    after = keyward.usage(account)
    assert after["shared"]["credits_used"] == before["shared"]["credits_used"], "token counting is free"
    assert after["by_provider"]["anthropic"]["shared"]["requests"] == before["by_provider"]["anthropic"]["shared"]["requests"] + 1
    e = last_ai_event(keyward, account)
    assert (e["outcome"], e["key_source"]) == ("ok", "shared"), e
