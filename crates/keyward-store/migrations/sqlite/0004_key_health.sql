-- keyward schema v4 (SQLite): what keyward knows about a saved key's kind and health.
--
-- `kind` is the key's format class (anthropic_api, openai_project, google_auth,
-- google_standard, ...), read from its prefix when it is saved: public knowledge about the
-- format, nothing secret. Keys saved before v4 get the only kind their provider's rule then
-- allowed (every Google key was a standard AIza key, every Anthropic key an API key);
-- OpenAI's are left unknown.
ALTER TABLE provider_keys ADD COLUMN kind TEXT;
ALTER TABLE shared_keys ADD COLUMN kind TEXT;
UPDATE provider_keys SET kind = 'google_standard' WHERE provider = 'google';
UPDATE provider_keys SET kind = 'anthropic_api' WHERE provider = 'anthropic';
UPDATE shared_keys SET kind = 'google_standard' WHERE provider = 'google';
UPDATE shared_keys SET kind = 'anthropic_api' WHERE provider = 'anthropic';

-- When the provider said the key was reported as leaked: calls on it stop until it is
-- replaced (a rotation clears it) or a test succeeds again.
ALTER TABLE provider_keys ADD COLUMN reported_leaked_at INTEGER;

-- What the last test found beyond ok/message, as JSON: rate-limit headroom, whether the
-- key itself is valid and which catalogued models it can use.
ALTER TABLE provider_keys ADD COLUMN last_test_detail TEXT;
