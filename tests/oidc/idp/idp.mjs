// A certified OpenID Connect provider (npm oidc-provider) for Shoal's sign-in tests.
//
// Usage: node idp.mjs CONFIG.json
//
// CONFIG.json (written by tests/oidc/idp.py):
//   {"issuer": "http://127.0.0.1:PORT", "host": "127.0.0.1", "port": PORT,
//    "client": {"client_id": ..., "client_secret": ..., "redirect_uris": [...]},
//    "jwks": {"keys": [<private JWK>]},          // the test knows the signing key, so it can forge tokens
//    "accounts_file": "accounts.json",           // re-read at every sign-in: the test edits groups in place
//    "id_token_ttl": 3600}
// accounts.json: {"<login>": {"email": ..., "email_verified": true, "groups": [...], ...}, ...}
// A login that is not in accounts.json has no account: the IdP refuses it.
//
// Login and consent are oidc-provider's built-in development pages (any password).
// PKCE is required for every client, as Shoal sends it always. Custom claims (groups) sit under the
// `groups` scope and, as oidc-provider does by default, come only from /userinfo, not in the ID token.
// Prints "ready <issuer>" on stdout once it listens.

import { readFileSync } from 'node:fs';
import Provider from 'oidc-provider';

const config = JSON.parse(readFileSync(process.argv[2], 'utf8'));

function accounts() {
  return JSON.parse(readFileSync(config.accounts_file, 'utf8'));
}

const provider = new Provider(config.issuer, {
  clients: [{
    grant_types: ['authorization_code'],
    response_types: ['code'],
    token_endpoint_auth_method: 'client_secret_basic',
    ...config.client,
  }],
  jwks: config.jwks,
  cookies: { keys: [config.cookie_key] },
  pkce: { required: () => true },
  scopes: ['openid', 'email', 'profile', 'groups'],
  claims: {
    openid: ['sub'],
    email: ['email', 'email_verified'],
    profile: ['name', 'preferred_username'],
    groups: ['groups'],
  },
  ttl: { IdToken: config.id_token_ttl ?? 3600 },
  features: { devInteractions: { enabled: true } },
  async findAccount(ctx, id) {
    const claims = accounts()[id];
    if (!claims) {
      return undefined;
    }
    return { accountId: id, async claims() { return { sub: id, ...claims }; } };
  },
  renderError(ctx, out) {
    ctx.type = 'html';
    ctx.body = `<h1>IdP error</h1><pre id="error">${out.error}: ${out.error_description ?? ''}</pre>`;
  },
});
provider.proxy = false;

provider.on('server_error', (ctx, err) => {
  process.stderr.write(`server_error ${err.stack}\n`);
});

const server = provider.listen(config.port, config.host, () => {
  process.stdout.write(`ready ${config.issuer}\n`);
});

function stop() {
  server.close();
  process.exit(0);
}
process.on('SIGTERM', stop);
process.on('SIGINT', stop);
