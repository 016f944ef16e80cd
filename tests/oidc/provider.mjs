// keyward's single sign-on tests: a real OpenID provider (the npm package oidc-provider,
// OpenID-certified) on loopback, with one confidential client (keyward).
//
//   node provider.mjs REDIRECT_URI POST_LOGOUT_URI CLIENT_SECRET
//
// prints `listening http://127.0.0.1:PORT` once it serves. The issuer is that URL; the client
// id is `keyward`.
//
// Test-only controls (plain HTTP on the same port, under /__test/):
//   POST /__test/account?sub=…&email=…&verified=0|1&uid=…  who the next sign-in logs in
//     (the interaction step logs them in and grants consent at once: no form)
//   POST /__test/rotate        new signing key (a new provider instance: new JWKS, old key gone)
//   POST /__test/tamper?mode=  aud | iss | exp | nonce | key | none: the ID token of the next
//     token responses is altered after oidc-provider made it, and re-signed with the
//     provider's own key (aud, iss, exp, nonce) or with a key the JWKS does not hold (key).
//     Everything else is oidc-provider's own behaviour.
import http from 'node:http';
import { generateKeyPairSync, randomUUID } from 'node:crypto';
import Provider from 'oidc-provider';
import * as jose from 'jose';

const [redirectUri, postLogoutUri, clientSecret] = process.argv.slice(2);
if (!redirectUri || !postLogoutUri || !clientSecret) {
  console.error('usage: node provider.mjs REDIRECT_URI POST_LOGOUT_URI CLIENT_SECRET');
  process.exit(2);
}

function newKey() {
  const { privateKey } = generateKeyPairSync('rsa', { modulusLength: 2048 });
  return { ...privateKey.export({ format: 'jwk' }), kid: randomUUID(), alg: 'RS256', use: 'sig' };
}

let account = { sub: 'user-1', email: 'user-1@example.test', email_verified: true };
let tamper = 'none';
let signingKey = newKey();
let provider;
let issuer;

function build() {
  const p = new Provider(issuer, {
    clients: [{
      client_id: 'keyward',
      client_secret: clientSecret,
      redirect_uris: [redirectUri],
      post_logout_redirect_uris: [postLogoutUri],
      response_types: ['code'],
      grant_types: ['authorization_code'],
      token_endpoint_auth_method: 'client_secret_basic',
    }],
    jwks: { keys: [signingKey] },
    cookies: { keys: ['keyward-oidc-test-cookie-key'] },
    // `uid`: a product's own user id, sent with the email scope (KEYWARD_OIDC_USER_CLAIM tests).
    claims: { openid: ['sub'], email: ['email', 'email_verified', 'uid'] },
    conformIdTokenClaims: false,
    pkce: { required: () => true, methods: ['S256'] },
    features: { devInteractions: { enabled: false }, rpInitiatedLogout: { enabled: true } },
    interactions: { url: (ctx, interaction) => `/interaction/${interaction.uid}` },
    async findAccount(ctx, id) {
      const a = { ...account };
      return { accountId: id, async claims() { return { ...a, sub: id }; } };
    },
  });
  // The interaction: logs in the configured account and grants what was asked, no form.
  p.use(async (ctx, next) => {
    const m = ctx.path.match(/^\/interaction\/([^/]+)$/);
    if (!m) return next();
    const details = await p.interactionDetails(ctx.req, ctx.res);
    let result;
    if (details.prompt.name === 'login') {
      result = { login: { accountId: account.sub } };
    } else {
      const grant = details.grantId
        ? await p.Grant.find(details.grantId)
        : new p.Grant({ accountId: details.session.accountId, clientId: details.params.client_id });
      if (details.prompt.details.missingOIDCScope) grant.addOIDCScope(details.prompt.details.missingOIDCScope.join(' '));
      if (details.prompt.details.missingOIDCClaims) grant.addOIDCClaims(details.prompt.details.missingOIDCClaims);
      result = { consent: { grantId: await grant.save() } };
    }
    const to = await p.interactionResult(ctx.req, ctx.res, result, { mergeWithLastSubmission: true });
    ctx.status = 303;
    ctx.redirect(to);
  });
  // The test-only tampering of the token endpoint's ID token.
  p.use(async (ctx, next) => {
    await next();
    if (ctx.path !== '/token' || tamper === 'none' || !ctx.body || !ctx.body.id_token) return;
    const claims = jose.decodeJwt(ctx.body.id_token);
    let key = signingKey;
    switch (tamper) {
      case 'aud': claims.aud = 'someone-else'; break;
      case 'iss': claims.iss = 'http://127.0.0.1:1/not-the-issuer'; break;
      case 'exp': claims.iat -= 7200; claims.exp = Math.floor(Date.now() / 1000) - 3600; break;
      case 'nonce': claims.nonce = 'not-the-nonce'; break;
      case 'key': key = newKey(); break;
      default: return;
    }
    const priv = await jose.importJWK(key, 'RS256');
    ctx.body = { ...ctx.body, id_token: await new jose.SignJWT(claims).setProtectedHeader({ alg: 'RS256', kid: key.kid, typ: 'JWT' }).sign(priv) };
  });
  return p;
}

const server = http.createServer((req, res) => {
  const url = new URL(req.url, issuer);
  if (url.pathname.startsWith('/__test/')) {
    const q = url.searchParams;
    switch (url.pathname) {
      case '/__test/account':
        account = { sub: q.get('sub'), email: q.get('email') || undefined, email_verified: q.get('verified') === '1' };
        if (q.get('uid')) account.uid = q.get('uid');
        break;
      case '/__test/rotate':
        signingKey = newKey();
        provider = build();
        break;
      case '/__test/tamper':
        tamper = q.get('mode') || 'none';
        break;
      default:
        res.writeHead(404).end();
        return;
    }
    res.writeHead(204).end();
    return;
  }
  provider.callback()(req, res);
});

server.listen(0, '127.0.0.1', () => {
  issuer = `http://127.0.0.1:${server.address().port}`;
  provider = build();
  console.log(`listening ${issuer}`);
});
