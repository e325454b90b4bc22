"""Checks that refuse a run before any work: a config the run cannot honour fails in one line, not after
training a victim or inside a traceback.

Every refusal is a ``ConfigError`` whose message names what was wrong and what is accepted, on one line;
``python -m experiments.run`` prints it once to stderr and exits with status 2. Importing this module loads
no JAX (the process that launches a sweep checks its launcher here before Hydra composes anything); checking
a defense config imports the ``defenses`` package.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

REFUSED_STATUS = 2
FLOAT32_BYTES = 4
CHAIN_FORM = (
    "'defense.members=[{_target_: heistlab.defenses.rounding, decimals: 2}, "
    "{_target_: heistlab.defenses.top_k, k: 3}]'"
)
# Defenses that answer from models of their own and ignore the probabilities they are handed: in a chain,
# whatever ran before them would be thrown away.
REPLACES_ANSWERS = ("heistlab.defenses.edm",)


class ConfigError(ValueError):
    """A config or input the run cannot use; its message is one line: the problem and what is accepted."""


def one_line(text: str) -> str:
    return " ".join(str(text).split())


def root_cause(error: BaseException) -> BaseException:
    """The innermost cause of ``error`` (Hydra wraps a factory's own error in ``InstantiationException``)."""
    while error.__cause__ is not None:
        error = error.__cause__
    return error


@contextlib.contextmanager
def building(what: str) -> Iterator[None]:
    """Turns a factory's refusal of its arguments (``ValueError``, ``TypeError``, an unknown ``_target_``)
    into a ``ConfigError`` that names the config group, ``what``."""
    try:
        yield
    except ConfigError:
        raise
    except Exception as error:
        from hydra.errors import InstantiationException

        cause = root_cause(error)
        if isinstance(error, InstantiationException) or isinstance(cause, ValueError | TypeError):
            raise ConfigError(f"{what}: {one_line(cause)}") from error
        raise


def check_integer(name: str, value: Any, example: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name} must be an integer (for example {example}); got {value!r}")
    return value


def check_seeds(cfg: Mapping) -> None:
    check_integer("seed", cfg.get("seed"), "seed=3, or a sweep: -m 'seed=range(3)'")
    victim = cfg.get("victim") or {}
    if "seed" in victim:
        check_integer("victim.seed", victim.get("seed"), "victim.seed=0")


def defense_factories() -> list[str]:
    """The defenses on offer, as ``_target_`` values (``heistlab.defenses.rounding``...)."""
    from heistlab import defenses

    return [
        f"heistlab.defenses.{name}" for name in defenses.__all__ if name[0].islower() and name != "stateless"
    ]


def importable(target: str) -> bool:
    """Whether ``package.module.name`` names something importable (Hydra's ``_target_`` form)."""
    module, _, name = target.rpartition(".")
    if not module:
        return False
    try:
        return hasattr(importlib.import_module(module), name)
    except ImportError:
        return False


def check_defense_spec(spec: Any, where: str = "defense") -> None:
    """Each defense config (and each member of a chain) is a mapping whose ``_target_`` can be imported."""
    if not isinstance(spec, Mapping):
        name = spec if isinstance(spec, str) else type(spec).__name__
        raise ConfigError(
            f"{where} is {name!r}, but chain members must be defense configs, not names; accepted form: "
            f"{CHAIN_FORM}"
        )
    target = spec.get("_target_")
    if not target:
        raise ConfigError(
            f"{where} has no _target_; accepted: one of {', '.join(defense_factories())} with its arguments"
        )
    if not importable(str(target)):
        raise ConfigError(
            f"{where} names an unknown defense {target!r}; accepted: {', '.join(defense_factories())}"
        )
    if target == "heistlab.defenses.chain":
        members = spec.get("members")
        if not members or isinstance(members, str | Mapping):
            raise ConfigError(
                f"{where}.members must be a non-empty list of defense configs; got {members!r}; accepted "
                f"form: {CHAIN_FORM}"
            )
        for index, member in enumerate(members):
            check_defense_spec(member, f"{where}.members[{index}]")
        for index, member in enumerate(members):
            if index > 0 and member.get("_target_") in REPLACES_ANSWERS:
                raise ConfigError(
                    f"{where}.members[{index}] is {member.get('_target_')}, which answers from its own "
                    f"models and would discard what the {index} member(s) before it served; accepted: it as "
                    "the chain's first member"
                )


def check_remote_api(api: Mapping) -> None:
    """``api=http`` needs the client's key file (and the CA file, when named) to exist."""
    if api.get("kind", "inprocess") != "http":
        return
    key_file = api.get("key_file")
    made_by = "python -m experiments.keys create --out client.json makes one"
    if key_file in (None, "", "???"):
        raise ConfigError(f"api=http needs api.key_file=<the client's key file>; none was given ({made_by})")
    if not Path(os.path.expanduser(str(key_file))).is_file():
        raise ConfigError(
            f"api.key_file={key_file} does not exist; accepted: an existing key file ({made_by})"
        )
    ca_file = api.get("ca_file")
    if ca_file is not None and not Path(os.path.expanduser(str(ca_file))).is_file():
        raise ConfigError(
            f"api.ca_file={ca_file} does not exist; accepted: the server's CA certificate file, or null"
        )


def check_static(cfg: Mapping) -> None:
    """Every check that needs only the config: seeds, defense configs and the remote API's files."""
    check_seeds(cfg)
    check_defense_spec(cfg["defense"])
    check_remote_api(cfg["api"])


def check_evasion_output(evasion_name: str, needs_scores: bool, output: str | None) -> None:
    """A score-based evasion (Square) cannot search through an API that serves labels only."""
    if needs_scores and output == "labels":
        raise ConfigError(
            f"evasion {evasion_name} needs scores, but api.output=labels serves labels only; accepted: "
            "api.output=probabilities or top_k, or a decision-based evasion (evasion=hopskipjump or "
            "adaptive_hopskipjump)"
        )


def check_attack_output(attack_name: str, needs_scores: bool, output: str | None) -> None:
    """An attack whose loss compares output distributions (MAZE) cannot learn from labels only."""
    if needs_scores and output == "labels":
        raise ConfigError(
            f"attack {attack_name} needs scores, but api.output=labels serves labels only; accepted: "
            "api.output=probabilities or top_k, or an attack that learns from labels (attack=dfme)"
        )


def check_api_top_k(api: Mapping, num_classes: int) -> None:
    if api.get("output") == "top_k" and api.get("top_k", 1) > num_classes:
        raise ConfigError(
            f"api.top_k={api.get('top_k')} exceeds the {num_classes} classes of the data; accepted: 1 to "
            f"{num_classes}"
        )


class VictimMismatch(NamedTuple):
    """An attack run against a victim it cannot extract, by the user's explicit choice."""

    message: str


def check_victim_family(attack, victim_model, victim_name: str, allowed: bool) -> VictimMismatch | None:
    """Refuses an exact-extraction attack against a victim outside the family it extracts, unless
    ``allowed`` (``attack.allow_mismatched_victim=true``): then the mismatch is returned, to be recorded."""
    family = attack.extracts
    if family is None or family.accepts(victim_model):
        return None
    message = f"attack {attack.name} extracts only {family.description}, but the victim is {victim_name}"
    if allowed:
        return VictimMismatch(message)
    raise ConfigError(
        f"{message}; choose such a victim, or set attack.allow_mismatched_victim=true to run it anyway "
        "(results.json then records the mismatch)"
    )


def available_memory() -> tuple[int, str] | None:
    """Bytes of memory available to a new allocation, and where the number came from (None if unknown)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024, "MemAvailable in /proc/meminfo"
    except (OSError, ValueError, IndexError):
        pass
    try:
        pages, size = os.sysconf("SC_AVPHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None
    return pages * size, "os.sysconf(SC_AVPHYS_PAGES)"


def gib(count: float) -> str:
    return f"{count / 2**30:.1f} GiB"


def check_transfer_set_memory(
    budget: int,
    input_shape: Sequence[int],
    num_classes: int,
    seeds: int,
    available: tuple[int, str] | None,
) -> None:
    """Refuses a budget whose queries (float32 inputs and scores, for every seed) cannot fit in memory."""
    if available is None:
        return
    per_query = (math.prod(input_shape) + num_classes) * FLOAT32_BYTES * seeds
    needed = budget * per_query
    free, source = available
    if needed > free:
        largest = free // per_query
        raise ConfigError(
            f"attack.budget={budget} needs about {gib(needed)} for the queries it keeps ({budget} x "
            f"({math.prod(input_shape)} inputs + {num_classes} scores) float32 x {seeds} seed(s)), more than "
            f"the {gib(free)} available ({source}); accepted: attack.budget up to about {largest}"
        )


class LauncherPlugin(NamedTuple):
    module: str
    package: str
    extra: str | None


_JOBLIB = LauncherPlugin("hydra_plugins.hydra_joblib_launcher", "hydra-joblib-launcher", None)
_SUBMITIT = LauncherPlugin("hydra_plugins.hydra_submitit_launcher", "hydra-submitit-launcher", "slurm")
_RAY = LauncherPlugin("hydra_plugins.hydra_ray_launcher", "hydra-ray-launcher", "ray")
# configs/hydra/launcher/*.yaml and Hydra's own launcher names, by the plugin each needs.
LAUNCHER_PLUGINS = {
    "parallel": _JOBLIB,
    "joblib": _JOBLIB,
    "slurm": _SUBMITIT,
    "submitit_slurm": _SUBMITIT,
    "submitit_local": _SUBMITIT,
    "ray_local": _RAY,
    "ray": _RAY,
}


def installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def check_launcher(arguments: Sequence[str], is_installed: Callable[[str], bool] | None = None) -> None:
    """Refuses ``hydra/launcher=NAME`` on the command line when NAME's plugin is not installed, naming the
    pip command (checked before Hydra composes, which would otherwise fail on the missing config).

    ``is_installed(module)`` says whether a plugin module can be imported (default: ``installed``).
    """
    is_installed = is_installed or installed
    for argument in arguments:
        key, _, value = argument.lstrip("+~").partition("=")
        if key != "hydra/launcher" or value not in LAUNCHER_PLUGINS:
            continue
        plugin = LAUNCHER_PLUGINS[value]
        if is_installed(plugin.module):
            continue
        command = f"pip install {plugin.package}"
        if plugin.extra:
            command += f' (in a checkout: pip install -e ".[{plugin.extra}]")'
        raise ConfigError(
            f"hydra/launcher={value} needs the {plugin.package} plugin, not installed; run: {command}"
        )
