"""heistlab: model stealing and prediction-API defenses on jit-compiled JAX.

The small core: data sets and splits, victim models and their training, the prediction API (the only door
to a victim), metrics, results and loggers. Attacks live in ``attacks/``, defenses in ``defenses/``.
"""

__version__ = "0.1.0"
