"""A subset of Tailscale's admin API v2 at ``/api/v2/``, with roles, API access tokens and OAuth clients.

Sans-IO cores: ``creds`` (credential texts, hashing, who a request is), ``access`` (what each role and OAuth scope
may do), ``shapes`` (request bodies in, Tailscale's JSON shapes out). The Starlette shell is ``routes``; every
write it makes is a ``Service`` command, the same the admin CLI runs. Endpoints: docs/api.md.
"""
