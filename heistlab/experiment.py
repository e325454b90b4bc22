"""One attack against one defended victim, from a composed Hydra config to a ``results.json`` record.

``run_experiment(cfg, output_dir)`` is the tested function behind ``python -m experiments.run``: it builds
the splits, loads or trains the victim (cached on disk), puts it behind the prediction API with the chosen
defense and budget, runs the attack through the API's handle, and measures what the field reports.
"""

from __future__ import annotations

import copy
import functools
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from heistlab import (
    checks,
    data,
    external_victims,
    metrics,
    results,
    seeds,
    training,
    victims,
)
from heistlab.api import PredictionAPI, QueryRefused
from heistlab.attacks.base import Attack, AttackResult, Surrogate
from heistlab.checks import ConfigError, building
from heistlab.compose import (
    build_api,
    build_defense,
    build_model_from,
    build_splits,
    defender_data,
    load_victim,
    train_config_from,
)
from heistlab.defenses import Defense, Evidence
from heistlab.progress import counter, counting_oracle, phase

COMPILE_EVENTS = (
    "/jax/core/compile/jaxpr_trace_duration",
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
    "/jax/core/compile/backend_compile_duration",
)
_compile_seconds = [0.0]


def _count_compile_time(event: str, duration: float, **_) -> None:
    if event in COMPILE_EVENTS:
        _compile_seconds[0] += duration


jax.monitoring.register_event_duration_secs_listener(_count_compile_time)


def uniform_inputs(shape: tuple[int, ...], count: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).uniform(size=(count, *shape)).astype(np.float32)


def measure(cfg, splits, victim, defense, attack_result, stolen_model, api, attackers) -> dict:
    """The run's metrics: victim and served accuracy, distortion, surrogate accuracy and fidelity, queries."""
    probs = victim.predict_proba(splits.test.x)
    # Utility is measured on what the defense serves; admission (caps, rate limits) is not utility.
    evaluation = PredictionAPI(victim, defense._replace(admit=None), key=jax.random.key(cfg.seed + 1_000_003))
    served = evaluation.query(splits.test.x, client="evaluation")
    stolen = training.predict_labels(stolen_model, attack_result.params, splits.test.x)
    noise = uniform_inputs(splits.input_shape, cfg.eval.uniform_samples, cfg.seed)
    victim_on_noise = victim.predict_proba(noise).argmax(axis=-1)
    stolen_on_noise = training.predict_labels(stolen_model, attack_result.params, noise)
    victim_labels = probs.argmax(axis=-1)
    return {
        "victim_accuracy": metrics.accuracy(victim_labels, splits.test.y),
        "served_accuracy": metrics.accuracy(served.argmax(axis=-1), splits.test.y),
        "mean_l1_distortion": metrics.mean_l1_distance(served, probs),
        "surrogate_accuracy": metrics.accuracy(stolen, splits.test.y),
        "fidelity_test": metrics.agreement(stolen, victim_labels),
        "fidelity_uniform": metrics.agreement(stolen_on_noise, victim_on_noise),
        "queries_served": sum(api.served(name) for name in attackers),
        "queries_refused": sum(api.refused(name) for name in attackers),
        "simulated_seconds": max(api.simulated_seconds(name) for name in attackers),
        "attack_rounds": len(attack_result.rounds),
        **(attack_result.metrics or {}),
    }


def stream_benign_clients(cfg: DictConfig, api: PredictionAPI, test: data.Dataset) -> tuple[str, ...]:
    """Streams the shuffled test split through the API as ``eval.benign_clients`` honest clients."""
    names = tuple(f"benign-{index}" for index in range(cfg.eval.benign_clients))
    for index, name in enumerate(names):
        order = np.random.default_rng([cfg.seed, index]).permutation(len(test.x))
        stream = test.x[order][: api.remaining(name)]
        for start in range(0, len(stream), cfg.eval.benign_batch):
            try:
                api.query(stream[start : start + cfg.eval.benign_batch], client=name)
            except QueryRefused:
                break  # the defense's cost to an honest client, counted by api.refused(name)
    return names


def evidence_for(cfg, splits, victim, stolen_model, stolen_params, attackers, benign, evaders=()) -> Evidence:
    """Label functions a defense's report may test; the independent model is trained only if asked for."""

    model, train_config = external_victims.independent_model(victim, splits.num_classes)

    @functools.cache
    def independent_params():
        key = jax.random.key(cfg.victim.seed + 7919)
        targets = training.one_hot(splits.victim_train.y, splits.num_classes)
        config = train_config or train_config_from(cfg.victim.train)
        return training.train_classifier(model, splits.victim_train.x, targets, key, config)

    return Evidence(
        surrogate_labels=lambda x: training.predict_labels(stolen_model, stolen_params, x),
        independent_labels=lambda x: training.predict_labels(model, independent_params(), x),
        victim_labels=lambda x: victim.predict_proba(x).argmax(axis=-1),
        attackers=tuple(attackers),
        benign=benign,
        evaders=tuple(evaders),
    )


def run_evasion_stage(cfg, splits, victim, api, stolen_model, stolen_params, evasion) -> dict:
    """Adversarial examples against the victim by ``evasion`` (built from the ``evasion`` config)."""
    from heistlab.attacks.evasion import EvasionStage, run_evasion

    stage = EvasionStage(
        api=api,
        surrogate_model=stolen_model,
        surrogate_params=stolen_params,
        inputs=splits.test.x,
        labels=splits.test.y,
        victim_labels=lambda x: victim.predict_proba(x).argmax(axis=-1),
        key=jax.random.fold_in(jax.random.key(cfg.seed), 2),
    )
    return run_evasion(evasion, stage)


class Prepared(NamedTuple):
    """What every seed of an experiment shares: data, defense, victim, attack, surrogate, evasion attack.

    victim_mismatch: set when the attack runs against a victim it cannot extract, by the user's choice.
    """

    splits: data.Splits
    defense: Defense
    victim: victims.Classifier
    victim_from_cache: bool
    attack: Attack
    surrogate: Surrogate
    victim_mismatch: checks.VictimMismatch | None = None
    evasion: object = None


# The attack config's opt-in to run an exact-extraction attack against a victim outside its family.
MISMATCH_OPT_IN = "allow_mismatched_victim"


def build_attack(spec: DictConfig) -> tuple[Attack, bool]:
    """The attack from its config, and whether it may run against a victim it cannot extract."""
    options = OmegaConf.to_container(spec, resolve=True)
    allowed = options.pop(MISMATCH_OPT_IN, False)
    if not isinstance(allowed, bool):
        raise ConfigError(f"attack.{MISMATCH_OPT_IN} must be true or false; got {allowed!r}")
    with building("attack"):
        return instantiate(options), allowed


def describe_victim(spec: DictConfig) -> str:
    options = OmegaConf.to_container(spec.options, resolve=True) if "options" in spec else {}
    return f"{spec.family} {options or ''}".strip()


def build_evasion(cfg: DictConfig):
    """The configured evasion attack (None without one), built before any training: bad settings, or a
    score-based evasion behind a labels-only API, are refused up front."""
    from heistlab.attacks.evasion import SCORE

    if not cfg.evasion.get("_target_"):
        return None
    with building("evasion"):
        evasion = instantiate(cfg.evasion)
    checks.check_evasion_output(evasion.name, evasion.kind == SCORE, cfg.api.get("output"))
    return evasion


@functools.lru_cache(maxsize=64)
def check_model_takes(model, input_shape: tuple[int, ...]) -> None:
    """Traces the model's initialisation on the data's input shape (no computation): a model that cannot
    take those inputs (``victim=lenet5`` on 8x8 digits) raises here, before anything is trained. A model
    and shape that passed are not traced again in this process (a failure is not remembered)."""
    jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, *input_shape), jnp.float32))


def check_against_data(cfg: DictConfig, splits: data.Splits, attack: Attack, allow_mismatch: bool):
    """Refusals that need the data's shapes, before the victim is trained; returns an allowed mismatch."""
    checks.check_api_top_k(cfg.api, splits.num_classes)
    if attack.keeps_queries:
        checks.check_transfer_set_memory(
            attack.budget,
            splits.input_shape,
            splits.num_classes,
            number_of_seeds(cfg),
            checks.available_memory(),
        )
    loaded = cfg.victim.family in external_victims.LOADED_KINDS  # no Flax module to inspect
    with building("victim"):
        victim_model = None if loaded else build_model_from(cfg.victim, splits.num_classes)
        if victim_model is not None:
            check_model_takes(victim_model, splits.input_shape)
    with building("surrogate"):
        check_model_takes(build_model_from(cfg.surrogate, splits.num_classes), splits.input_shape)
    return checks.check_victim_family(attack, victim_model, describe_victim(cfg.victim), allow_mismatch)


def prepare(cfg: DictConfig) -> Prepared:
    """Checks the config (``heistlab.checks``: a ``ConfigError`` before any training), then loads the data
    and the victim (trained when not cached) and builds the defense, attack and surrogate."""
    checks.check_static(cfg)
    attack, allow_mismatch = build_attack(cfg.attack)
    checks.check_attack_output(attack.name, attack.needs_scores, cfg.api.get("output"))
    evasion = build_evasion(cfg)
    with phase(f"loading {cfg.data.name}"), building("data"):
        splits = build_splits(cfg)
    with building("victim"):
        # Reads a loaded victim's input shape and classes: a mismatch with the data stops here.
        external_victims.load_configured(cfg.victim, splits, trains_victim=False)
    mismatch = check_against_data(cfg, splits, attack, allow_mismatch)
    with building("defense"):
        defense = build_defense(cfg.defense, defender_data(cfg, splits))
    with building("surrogate"):
        surrogate = Surrogate(
            build_model_from(cfg.surrogate, splits.num_classes), train_config_from(cfg.surrogate.train)
        )
    with phase(f"loading or training the {cfg.victim.family} victim") as ready:
        victim, from_cache = load_victim(cfg, splits, defense)
        ready(getattr(victim, "params", None))  # a loaded victim (onnx, callable) holds no JAX arrays
    return Prepared(splits, defense, victim, from_cache, attack, surrogate, mismatch, evasion)


def attack_key(cfg: DictConfig) -> jax.Array:
    return jax.random.fold_in(jax.random.key(cfg.seed), 1)


def attacker_view(cfg: DictConfig, prepared: Prepared, advance=None):
    """A fresh API around the prepared victim and defense, and the attacker's oracle on it.

    ``advance(n)``, when given, is told of every ``n`` queries the oracle is served (a progress bar).
    """
    api = build_api(cfg, prepared.victim, prepared.defense)
    oracle = api.oracle("attacker", identities=cfg.api.attacker_identities)
    return api, oracle if advance is None else counting_oracle(oracle, advance)


# At most this many readings of the defense's report while an attack runs (``monitored_oracle``).
MONITOR_READINGS = 100


def _no_model(inputs: np.ndarray) -> np.ndarray:
    raise LookupError("no stolen or independent model exists while the attack runs")


def monitored_oracle(oracle, api: PredictionAPI, victim, budget: int, timeline: list):
    """``oracle`` with the defense's report read as the attack runs, the way a server reads it online.

    After a served batch, once ``ceil(budget / MONITOR_READINGS)`` queries or more were served since the last
    reading, ``timeline`` gets ``{"queries": served so far, **the report's numbers}`` (PRADA's
    ``prada_min_w_attack`` and ``detected`` for the attacker's identities, any detector's statistics), so a
    sweep can plot when each defense noticed the attacker. A report that needs a stolen model (a watermark
    test) cannot be read before the attack ends: its first failure stops the readings.
    """
    from heistlab.api import Oracle
    from heistlab.serving.service import report_numbers

    def victim_labels(inputs: np.ndarray) -> np.ndarray:
        return np.asarray(victim.predict_proba(inputs)).argmax(axis=-1)

    evidence = Evidence(_no_model, _no_model, victim_labels, tuple(oracle.clients), ())
    every = max(1, -(-budget // MONITOR_READINGS))  # ceil: at most MONITOR_READINGS readings
    served, last_read, readable = [0], [0], [True]

    def query(inputs):
        answers = oracle.query(inputs)
        served[0] += len(answers)
        if readable[0] and served[0] - last_read[0] >= every:
            try:
                numbers = report_numbers(api.report(evidence))
            except Exception:
                readable[0] = False
                return answers
            timeline.append({"queries": served[0], **numbers})
            last_read[0] = served[0]
        return answers

    return Oracle(
        query, lambda: oracle.remaining, oracle.input_shape, oracle.num_classes, oracle.output, oracle.clients
    )


def run_facts(prepared: Prepared, started: float, compile_before: float) -> dict:
    """How the run went beside what it measured: victim cache hit, wall and compile seconds so far, and the
    victim mismatch the user allowed (``attack.allow_mismatched_victim``), if any."""
    facts = {
        "victim_from_cache": prepared.victim_from_cache,
        "wall_seconds": time.perf_counter() - started,
        "compile_seconds": _compile_seconds[0] - compile_before,
    }
    if prepared.victim_mismatch is not None:
        facts["victim_mismatch"] = prepared.victim_mismatch.message
    return facts


def assess(cfg: DictConfig, prepared: Prepared, api, oracle, attack_result: AttackResult) -> dict:
    """Everything measured after the attack: utility, fidelity, queries, the defense's report, evasion."""
    splits, victim, defense = prepared.splits, prepared.victim, prepared.defense
    stolen_model = attack_result.model or prepared.surrogate.model
    with phase("measuring"):
        found = measure(cfg, splits, victim, defense, attack_result, stolen_model, api, oracle.clients)
        benign = stream_benign_clients(cfg, api, splits.test)
    evaders = ()
    if prepared.evasion is not None:
        from heistlab.attacks.evasion import EVADER

        with phase(f"evasion: {cfg.evasion._target_}") as ready:
            evaded = run_evasion_stage(
                cfg, splits, victim, api, stolen_model, attack_result.params, prepared.evasion
            )
            found.update(ready(evaded))
        evaders = (EVADER,)
    # The defense reports after the evasion stage, so a detector of evasion (Blacklight) sees the evader too.
    with phase("reading the defense's report") as ready:
        evidence = evidence_for(
            cfg, splits, victim, stolen_model, attack_result.params, oracle.clients, benign, evaders
        )
        found.update(ready(api.report(evidence)))
    if _is_served_victim(victim):  # reached through the API: the evaluation's own rows, counted apart
        found["evaluation_queries"] = victim.queries
    return found


def execute(cfg: DictConfig, rounds: list | None = None, timeline: list | None = None) -> dict:
    """Runs the experiment described by ``cfg`` (one seed) and returns its metrics (no files written here).

    ``rounds``, when given, receives the attack's per-round records (queries, known set size...);
    ``timeline`` the defense report's numbers as the queries were served (``monitored_oracle``).
    """
    started, compile_before = time.perf_counter(), _compile_seconds[0]
    prepared = prepare(cfg)
    attack = prepared.attack
    with (
        counter("queries served", attack.budget) as advance,
        phase(f"running {attack.name} (budget {attack.budget})") as ready,
    ):
        api, oracle = attacker_view(cfg, prepared, advance)
        if timeline is not None and prepared.defense.report is not None:
            oracle = monitored_oracle(oracle, api, prepared.victim, attack.budget, timeline)
        attack_result = ready(attack.run(oracle, prepared.splits.pool, prepared.surrogate, attack_key(cfg)))
    if rounds is not None:
        rounds.extend(dict(entry) for entry in attack_result.rounds)
    found = assess(cfg, prepared, api, oracle, attack_result)
    found.update(run_facts(prepared, started, compile_before))
    return found


def number_of_seeds(cfg: DictConfig) -> int:
    count = cfg.get("num_seeds", 1)
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ConfigError(f"num_seeds must be an integer >= 1, got {count!r}")
    if count > 1 and cfg.api.get("kind", "inprocess") != "inprocess":
        raise ConfigError(
            f"num_seeds={count} needs api=inprocess (one fresh API per seed); a remote API's budget and "
            "state are shared by every seed. Sweep seeds with -m 'seed=range(N)' instead."
        )
    return count


def with_seed(cfg: DictConfig, seed: int) -> DictConfig:
    seeded = copy.deepcopy(cfg)
    seeded.seed = seed
    return seeded


def mean_metrics(per_seed: list[dict]) -> dict:
    """Each numeric metric's mean over the seeds (booleans: the fraction of seeds where it held)."""
    names = dict.fromkeys(name for metrics in per_seed for name in metrics)
    means = {}
    for name in names:
        values = [metrics.get(name) for metrics in per_seed]
        if all(isinstance(value, bool | int | float) for value in values):
            means[name] = float(np.mean(values))
    return means


def attack_every_seed(
    prepared: Prepared, oracles: Sequence, configs: Sequence[DictConfig]
) -> list[AttackResult]:
    """Each seed's attack through its own oracle; a query-then-train attack's surrogates train together."""
    attack, pool, surrogate = prepared.attack, prepared.splits.pool, prepared.surrogate
    pairs = list(zip(oracles, configs, strict=True))
    if attack.collect is None:
        return [attack.run(oracle, pool, surrogate, attack_key(seeded)) for oracle, seeded in pairs]
    collected = [attack.collect(oracle, pool, surrogate, attack_key(seeded)) for oracle, seeded in pairs]
    stacked = seeds.train_classifiers_per_seed(
        surrogate.model,
        [transfer.inputs for transfer in collected],
        [transfer.targets for transfer in collected],
        jnp.stack([transfer.train_key for transfer in collected]),
        surrogate.train,
    )
    return [
        AttackResult(seeds.params_for_seed(stacked, index), len(transfer.inputs), transfer.rounds)
        for index, transfer in enumerate(collected)
    ]


def execute_seeds(cfg: DictConfig) -> tuple[dict, list[dict]]:
    """Runs seeds ``cfg.seed .. cfg.seed + num_seeds - 1``; returns the mean metrics and one record per seed.

    Seed ``s`` is the experiment ``seed=s`` would run, against its own fresh API. When the attack queries
    first and trains once (``Attack.collect``), every seed's transfer set is collected, then all surrogates
    are trained by one vmapped program (``heistlab.seeds``); other attacks run seed after seed.
    """
    started, compile_before = time.perf_counter(), _compile_seconds[0]
    count = number_of_seeds(cfg)
    prepared = prepare(cfg)
    configs = [with_seed(cfg, cfg.seed + index) for index in range(count)]
    attack = prepared.attack
    with (
        counter(f"queries served ({count} seeds)", attack.budget * count) as advance,
        phase(f"running {attack.name} (budget {attack.budget}) for {count} seeds") as ready,
    ):
        apis, oracles = zip(*(attacker_view(seeded, prepared, advance) for seeded in configs), strict=True)
        results_by_seed = ready(attack_every_seed(prepared, oracles, configs))
    per_seed = [
        {
            "seed": seeded.seed,
            "metrics": assess(seeded, prepared, api, oracle, result),
            "rounds": [dict(entry) for entry in result.rounds],
        }
        for seeded, api, oracle, result in zip(configs, apis, oracles, results_by_seed, strict=True)
    ]
    found = mean_metrics([record["metrics"] for record in per_seed])
    found["num_seeds"] = count
    found["seeds_vectorised"] = attack.collect is not None
    found.update(run_facts(prepared, started, compile_before))
    return found, per_seed


def run_experiment(cfg: DictConfig, output_dir: Path, logger=None) -> dict:
    """Runs ``cfg``, writes ``output_dir/results.json`` atomically and returns the metrics.

    With ``num_seeds`` > 1 the metrics are means over the seeds, and ``seeds`` holds each seed's own metrics
    and rounds (``execute_seeds``). A run that fails still leaves a ``results.json`` with ``status: failed``
    and the error, then re-raises.
    """
    record = {
        "config": OmegaConf.to_container(cfg, resolve=True),
        "metrics": {},
        "versions": results.versions(),
        "seed": cfg.seed,
        "status": "running",
    }
    if logger is not None:
        logger.log_config(record["config"])
    try:
        if number_of_seeds(cfg) == 1:
            rounds: list[dict] = []
            timeline: list[dict] = []
            record["metrics"] = execute(cfg, rounds, timeline)
            record["rounds"] = rounds
            record["monitor"] = timeline
        else:
            record["metrics"], record["seeds"] = execute_seeds(cfg)
    except ConfigError as error:
        record.update(status="refused", error=str(error))
        results.write_results(output_dir, record)
        if logger is not None:
            logger.finish("refused")
        raise
    except BaseException as error:
        record.update(status="failed", error="".join(traceback.format_exception(error)))
        results.write_results(output_dir, record)
        if logger is not None:
            logger.finish("failed")
        raise
    record["status"] = "complete"
    results.write_results(output_dir, record)
    if logger is not None:
        logger.log_metrics(record["metrics"])
        for reading in record.get("monitor", ()):
            logger.log_metrics(
                {f"monitor/{name}": value for name, value in reading.items()}, reading["queries"]
            )
        logger.finish("complete")
    return record["metrics"]


def _is_served_victim(victim) -> bool:
    """Whether ``victim`` is an OIP server's model; never imports the HTTP client for a run that did not."""
    oip_client = sys.modules.get("heistlab.serving.oip_client")
    return oip_client is not None and isinstance(victim, oip_client.OIPVictim)
