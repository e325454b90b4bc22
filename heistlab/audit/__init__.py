"""Security audit of a prediction API (heistlab issue 8): ``python -m experiments.audit target=...``.

- ``target``: which target an audit may talk to (loopback only unless allowed) and a guard on every request;
- ``findings``: ``Finding``, severities and the exit status that gates a deployment pipeline;
- ``ledger``: the audit's total query budget, charged per battery member;
- ``extraction``, ``evasion``: the attack battery (Knockoff Nets, JBDA, equation solving; Square or
  HopSkipJump through the API, FGSM transfer) rated by what it reached;
- ``probes``: abuse probes against a served target (credentials, tokens, roles, throttles, validation);
- ``battery``: ``run_audit(cfg)`` and ``audit_command(cfg, out_dir)``; ``report``: Markdown, HTML, figures.

Modules are imported on use (``heistlab.audit.findings`` and ``heistlab.audit.target`` load without JAX).
"""
