"""Audits a prediction API (heistlab issue 8): extraction, evasion and abuse probes under one query budget;
writes report.md, report.html and findings.json; exits non-zero when a finding reaches ``audit.fail_on``.

    python -m experiments.audit target=https://127.0.0.1:8443 audit.ca_file=tls/cert.pem \
        audit.credentials.client_key_file=client.json audit.credentials.low_role_key_file=labels.json \
        audit.credentials.admin_key_file=admin.json audit.credentials.revocable_key_file=disposable.json
    python -m experiments.audit target=inprocess defense=rounding api.output=labels
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig


@hydra.main(config_path="../configs", config_name="audit", version_base="1.3")
def main(cfg: DictConfig) -> None:
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
    from heistlab.audit.battery import audit_command
    from heistlab.compose import cache_directory, enable_compilation_cache

    enable_compilation_cache(cache_directory(cfg))
    out_dir = cfg.audit.out_dir or HydraConfig.get().runtime.output_dir
    sys.exit(audit_command(cfg, Path(str(out_dir)).expanduser()))


if __name__ == "__main__":
    main()
