"""Serves a defended victim over HTTPS (heistlab issue 7): the prediction API, keys, roles, quotas, audit.

    python -m experiments.keys selfsigned --out tls
    python -m experiments.keys create --store keys.json --role probabilities --out client.json
    python -m experiments.serve serve.key_store=keys.json \
        serve.certfile=tls/cert.pem serve.keyfile=tls/key.pem defense=rounding serve.quota=5000

Then ``python -m experiments.run api=http api.key_file=client.json api.ca_file=tls/cert.pem`` attacks it.
``serve.workers=4`` serves with four processes on one port (``heistlab.serving.workers``).
"""

from __future__ import annotations

import logging

import hydra
from omegaconf import DictConfig

from heistlab.compose import cache_directory, enable_compilation_cache
from heistlab.protection import ProtectionError
from heistlab.serving import require_server_packages
from heistlab.victims import TamperedCheckpointError

# Refusals a start-up can meet (a refused checkpoint or key, a missing file, a bad setting): one clear line.
STARTUP_REFUSALS = (ProtectionError, TamperedCheckpointError, FileNotFoundError, ValueError)


@hydra.main(config_path="../configs", config_name="serve", version_base="1.3")
def main(cfg: DictConfig) -> None:
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
    require_server_packages()
    from heistlab.serving.app import app_from_config
    from heistlab.serving.server import serve_forever, uvicorn_config
    from heistlab.serving.workers import check_workers, serve_workers

    workers = check_workers(cfg.serve.get("workers", 1))
    if workers > 1:
        raise SystemExit(serve_workers(cfg, workers))
    enable_compilation_cache(cache_directory(cfg))
    try:
        app, settings = app_from_config(cfg)
        config = uvicorn_config(app, *settings)
    except STARTUP_REFUSALS as error:
        raise SystemExit(f"experiments.serve refused to start: {error}") from None
    serve_forever(config)


if __name__ == "__main__":
    main()
