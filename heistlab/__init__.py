"""heistlab: model stealing and prediction-API defenses on jit-compiled JAX.

The small core: data sets and splits, victim models and their training, the prediction API (the only door
to a victim), metrics, results and loggers. Attacks are ``heistlab.attacks``, defenses ``heistlab.defenses``,
the command-line entry points ``heistlab.experiments`` and the Hydra configs ``heistlab.configs``: a wheel
installs them inside this package; a source checkout keeps them at the repository's top level
(``attacks/``, ``defenses/``, ``experiments/``, ``configs/``), found through this package's path below.
"""

from pathlib import Path as _Path

__version__ = "0.1.0"

_checkout = _Path(__file__).resolve().parent.parent
if (_checkout / "pyproject.toml").is_file() and (_checkout / "attacks" / "__init__.py").is_file():
    __path__.append(str(_checkout))
