"""The prediction API served over HTTPS, and the remote oracle that attacks it (heistlab issue 7).

- ``auth``: API keys (salted scrypt hashes in an operator's key store), OAuth 2.0 client-credentials bearer
  tokens (HMAC-SHA256), roles;
- ``validation``: the request schema and its checks; ``throttle``: ``defenses.budget`` and
  ``defenses.rate_limit`` on the real clock;
- ``audit``: the SQLite audit log (optionally AES-256-GCM encrypted at rest, each row bound to its id, and
  HMAC-chained with a MACed head, so deletions and edits are found);
  ``service``: the defended victim behind one lock; ``app``: the FastAPI app;
- ``workers``: start-up (the audit log verified) and several processes on one port; ``shared``: the quota
  and rate limit those processes share;
- ``server``: uvicorn over TLS; ``tls``: a self-signed pair; ``client``: ``http_oracle`` and ``remote_api``.

Modules are imported on use, so the key tools load without JAX.
"""

import importlib.util

SERVER_PACKAGES = ("fastapi", "uvicorn", "prometheus_client")


def require_server_packages(packages: tuple[str, ...] = SERVER_PACKAGES) -> None:
    """Stops with the pip command to run when the ``serve`` extra (FastAPI, uvicorn, prometheus-client) is
    not installed."""
    missing = [name for name in packages if importlib.util.find_spec(name) is None]
    if missing:
        raise SystemExit(
            f"the prediction server needs {', '.join(missing)} (the serve extra): "
            "pip install 'heistlab[serve]'"
        )
