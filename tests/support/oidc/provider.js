// A real OpenID provider (panva's certified oidc-provider) for mi2b2's tests, on 127.0.0.1 only.
//
//   node provider.js <port> <settings.json>
//
// settings.json: { "client_id", "client_secret", "redirect_uris": [...], "post_logout_redirect_uris": [...],
//                  "users": { login: { "password", "name", "groups": [...] } }, "id_token_claims": bool,
//                  "tls": { "key", "cert" } (optional) }
// Prints "listening on http://127.0.0.1:<port>" once it accepts connections; SIGTERM stops it.
import { generateKeyPairSync, randomBytes } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { createServer as createHttpServer } from 'node:http';
import { createServer } from 'node:https';
import { parse } from 'node:querystring';

import Provider from 'oidc-provider';

const [port, settingsFile] = process.argv.slice(2);
const settings = JSON.parse(readFileSync(settingsFile, 'utf8'));
const issuer = `${settings.tls ? 'https' : 'http'}://127.0.0.1:${port}`;
const users = settings.users;

// A signing key of this run only: an ID token from an earlier run must not verify.
const { privateKey } = generateKeyPairSync('rsa', { modulusLength: 2048 });
const signingKey = { ...privateKey.export({ format: 'jwk' }), kid: randomBytes(8).toString('hex'), use: 'sig', alg: 'RS256' };

const provider = new Provider(issuer, {
  clients: [{
    client_id: settings.client_id,
    client_secret: settings.client_secret,
    redirect_uris: settings.redirect_uris,
    post_logout_redirect_uris: settings.post_logout_redirect_uris,
    grant_types: ['authorization_code'],
    response_types: ['code'],
    token_endpoint_auth_method: 'client_secret_basic',
  }],
  jwks: { keys: [signingKey] },
  cookies: { keys: [randomBytes(32).toString('hex')] },
  pkce: { required: () => true, methods: ['S256'] },
  scopes: ['openid', 'profile', 'groups'],
  claims: { openid: ['sub'], profile: ['name', 'preferred_username'], groups: ['groups'] },
  // Default true: the groups then reach mi2b2 only through userinfo. False puts every claim into the ID token.
  conformIdTokenClaims: settings.id_token_claims !== true,
  ttl: { Interaction: 600, Session: 3600, Grant: 3600, AccessToken: 600, IdToken: 600 },
  features: { devInteractions: { enabled: true }, rpInitiatedLogout: { enabled: true } },
  async findAccount(ctx, id) {
    const user = users[id];
    if (!user) return undefined;
    return {
      accountId: id,
      async claims() {
        return { sub: id, name: user.name, preferred_username: id, groups: user.groups };
      },
    };
  },
});

// The built-in development login accepts any password: check it before its handler sees the form.
provider.use(async (ctx, next) => {
  if (ctx.method === 'POST' && /^\/interaction\/[^/]+$/.test(ctx.path)) {
    const chunks = [];
    for await (const chunk of ctx.req) chunks.push(chunk);
    const body = Buffer.concat(chunks);
    const form = parse(body.toString('utf8'));
    if (form.prompt === 'login' && users[form.login]?.password !== form.password) {
      ctx.status = 401;
      ctx.type = 'html';
      ctx.body = '<!doctype html><p id="op-error">Wrong login or password.</p>';
      return;
    }
    ctx.req.body = body; // the handler reads the form from here once the stream is spent
  }
  await next();
});

// With "tls": { "key", "cert" } (PEM files) it serves https, as a production provider does.
const server = settings.tls
  ? createServer({ key: readFileSync(settings.tls.key), cert: readFileSync(settings.tls.cert) }, provider.callback())
  : createHttpServer(provider.callback());
server.listen(Number(port), '127.0.0.1', () => {
  console.log(`listening on ${issuer}`);
});
server.on('connection', (socket) => socket.setNoDelay(true));
process.on('SIGTERM', () => server.close(() => process.exit(0)));
