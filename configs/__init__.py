"""The Hydra config groups, one per concern (installed as ``heistlab.configs`` by the wheel)."""
