"""Identity: sign-in with any OpenID Connect provider, browser sessions and CSRF.

Pure core (no I/O, no clock: time and random values are passed in):
- `config`: the ``[oidc]`` server config, parsed with errors that name the key; the client secret never leaks;
- `claims`: validated claims -> `Profile` (identity = issuer + subject, derived name, groups via the mapping)
  or `Refused`;
- `flow`: single-use login URLs bound to pending nodes, per-login state/nonce/PKCE, confirmations;
- `sessions`: opaque session ids stored hashed, CSRF tokens, cookie attributes (reused by the web console);
- `refusals`: refused sign-ins counted, one audit record per user per minute;
- `pages`: the HTML.

Shell: `oidc` (discovery, JWKS, code exchange, ID token and /userinfo through authlib, joserfc and httpx) and
`web` (the Starlette routes).
"""
