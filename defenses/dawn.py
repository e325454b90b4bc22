"""DAWN: Dynamic Adversarial Watermarking of Neural Networks (Szyller, Atli, Marchal and Asokan, ACM MM 2021).

A keyed filter picks a small fraction ``rate`` of queries: those whose HMAC-SHA256 under the owner's secret
key has its first 16 bits below ``2 ** 16 * rate``. A picked query is answered with a wrong label chosen by
the same digest (one-hot, the same for the same input), everything else is answered truthfully. A model
trained on the answers learns the wrong labels too; the owner later shows that a suspect model agrees with
them far more often than chance allows, while a model trained independently does not.

Ownership is a binomial test with one trial per distinct watermarked input. The filter and the wrong label
are functions of the input's bytes (and the victim's top-1 class), so an attacker who sends the same input
again receives the same answer: a repeat is not a new trial. Inputs count as the same when the bytes the
filter hashes (``input_bytes``) are; each is judged against the label first served for it, and later answers
to it are ignored (they are identical unless a randomised defense earlier in a chain changed the top-1
class). The paper's bar for ownership is confidence ``1 - 2^-64``, that is ``p < 2^-64``.

The key never lives in a config or in code: ``key_file`` names a file holding it, ``key_env`` an environment
variable; with neither, each run draws a random key (and says so in the log), so verification works within
the run only. The filter hashes input bytes on the host, so the defense is host-side.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import NamedTuple

import jax
import numpy as np

from heistlab.defenses.base import Defense, Evidence, QueryContext, distinct_rows

log = logging.getLogger(__name__)

DEFAULT_KEY_ENV = "HEISTLAB_DAWN_KEY"
KEY_BYTES = 32
FILTER_BITS = 16
TAG_BYTES = 32  # HMAC-SHA256
PAPER_BAR_BITS = 64  # Szyller et al. claim ownership when p < 2^-64


class WatermarkRecord(NamedTuple):
    """One watermarked answer: who asked, the input's SHA-256, the input itself and the label served."""

    client: str | None
    digest: str
    input: np.ndarray
    label: int


class DawnState(NamedTuple):
    """The watermarked answers so far (one record per answer, repeats included), how many answers each client
    received, and the answers' class count."""

    records: tuple[WatermarkRecord, ...] = ()
    answered: Mapping[str | None, int] = MappingProxyType({})
    classes: int = 0


def dawn(rate: float = 0.005, key_env: str | None = DEFAULT_KEY_ENV, key_file: str | None = None) -> Defense:
    """Answers a keyed fraction ``rate`` of queries with a keyed wrong label, recording them for verification.

    The key comes from ``key_file`` if given, else from the environment variable ``key_env`` if it is set,
    else from ``os.urandom`` for this run only. ``report(state, evidence)`` tests the attackers' watermarked
    inputs (``Evidence.attackers``) against the stolen and the independent model: ``watermarked_queries``
    counts the watermarked answers served, ``watermarked_inputs`` the distinct inputs among them (the
    binomial trials); ``watermark_accuracy``, ``watermark_p_value``, ``watermark_confidence_bits``
    (``-log2 p``) and ``watermark_meets_paper_bar`` (``p < 2^-64``) are computed over the distinct inputs, and
    again with the suffix ``_independent`` for the independently trained model.

    Raises:
      ValueError: naming the argument, if ``rate`` is not in ``(0, 1]``, ``key_file`` cannot be read or is
        empty, or ``key_env`` is set to an empty value.
    """
    if not (_is_finite_number(rate) and 0.0 < rate <= 1.0):
        raise ValueError(f"dawn: rate must be a number in (0, 1], got {rate!r}")
    secret = load_key(key_env, key_file)
    threshold = 2**FILTER_BITS * rate

    def apply(probs: jax.Array, state: DawnState, context: QueryContext) -> tuple[jax.Array, DawnState]:
        served = np.array(probs, copy=True)
        classes = served.shape[-1]
        if classes < 2:
            raise ValueError(f"dawn: needs at least 2 classes to serve a wrong label, got {classes}")
        inputs = np.asarray(context.inputs)
        first, occurrence = distinct_rows(inputs)  # a repeated row takes its first copy's tag
        hashed = rows_as_bytes(inputs[first])
        tags = keyed_tags(secret, hashed)
        rows = np.flatnonzero((filter_values(tags) < threshold)[occurrence]).tolist()
        copies = occurrence[rows].tolist()
        tops = np.argmax(served[rows], axis=-1).tolist()
        labels = [watermark_label(tags[copy], top, classes) for copy, top in zip(copies, tops, strict=True)]
        served[rows] = 0
        served[rows, labels] = 1
        digests = [hashlib.sha256(hashed[copy]).hexdigest() for copy in copies]
        records = tuple(
            WatermarkRecord(context.client, digest, inputs[row].copy(), label)
            for row, digest, label in zip(rows, digests, labels, strict=True)
        )
        answered = {**state.answered, context.client: state.answered.get(context.client, 0) + len(served)}
        return served, DawnState(state.records + records, answered, classes)

    def report(state: DawnState, evidence: Evidence) -> dict:
        attackers = set(evidence.attackers)
        marked = [record for record in state.records if record.client in attackers]
        answered = sum(count for client, count in state.answered.items() if client in attackers)
        trials = distinct_inputs(marked)
        found = {
            "watermarked_queries": len(marked),
            "watermarked_inputs": len(trials),
            "watermark_fraction": len(marked) / answered if answered else 0.0,
        }
        for suffix, labels_of in (
            ("", evidence.surrogate_labels),
            ("_independent", evidence.independent_labels),
        ):
            accuracy, p_value, bits = verify(trials, labels_of, state.classes)
            found[f"watermark_accuracy{suffix}"] = accuracy
            found[f"watermark_p_value{suffix}"] = p_value
            found[f"watermark_confidence_bits{suffix}"] = bits
            found[f"watermark_meets_paper_bar{suffix}"] = bits > PAPER_BAR_BITS
        return found

    return Defense(init=DawnState, apply=apply, report=report, host=True)


def load_key(key_env: str | None, key_file: str | None, owner: str = "dawn") -> bytes:
    """The secret: the bytes of ``key_file``, else of ``$key_env``, else a fresh random key (logged).

    ``owner`` names the defense in errors and in the log (other keyed defenses share this loader).
    """
    if key_file is not None:
        path = Path(os.path.expanduser(str(key_file)))
        try:
            secret = path.read_bytes().strip()
        except OSError as error:
            raise ValueError(f"{owner}: key_file {str(path)!r} cannot be read ({error.strerror})") from None
        if not secret:
            raise ValueError(f"{owner}: key_file {str(path)!r} is empty; it must hold the secret key")
        return secret
    if key_env is not None and key_env in os.environ:
        if not os.environ[key_env]:
            raise ValueError(f"{owner}: key_env {key_env!r} names an empty environment variable")
        return os.environ[key_env].encode()
    log.warning(
        "%s: no key_file and no $%s set; using a random key for this run only, so what it keys cannot be "
        "reproduced after the run",
        owner,
        key_env,
    )
    return os.urandom(KEY_BYTES)


def input_bytes(query: np.ndarray) -> bytes:
    """The bytes the filter hashes: the input as contiguous float32 (what the prediction API serves)."""
    return np.ascontiguousarray(query, np.float32).tobytes()


def rows_as_bytes(inputs: np.ndarray) -> list[memoryview]:
    """Each row's ``input_bytes``, as views into one float32 copy of the batch."""
    view = memoryview(np.ascontiguousarray(inputs, np.float32).tobytes())
    if not len(view):
        return [view] * len(inputs)
    width = len(view) // len(inputs)
    return [view[start : start + width] for start in range(0, len(view), width)]


def keyed_tags(secret: bytes, rows: list[bytes | memoryview]) -> list[bytes]:
    """HMAC-SHA256 (RFC 2104) under ``secret`` of each of ``rows``."""
    return list(map(keyed_hasher(secret), rows))


def keyed_hasher(secret: bytes) -> Callable[[bytes | memoryview], bytes]:
    """The HMAC-SHA256 of one message under ``secret``.

    ``hmac.digest`` sets the key up again for every message; here the hash states after the padded key's
    inner and outer blocks are computed once and copied per message: the same tags, in under half the time.
    """
    block = hashlib.sha256().block_size
    if len(secret) > block:
        secret = hashlib.sha256(secret).digest()
    padded = secret.ljust(block, b"\0")
    inner = hashlib.sha256(bytes(byte ^ 0x36 for byte in padded))
    outer = hashlib.sha256(bytes(byte ^ 0x5C for byte in padded))

    def tag(message: bytes | memoryview) -> bytes:
        inner_hash = inner.copy()
        inner_hash.update(message)
        outer_hash = outer.copy()
        outer_hash.update(inner_hash.digest())
        return outer_hash.digest()

    return tag


def filter_values(tags: list[bytes]) -> np.ndarray:
    """Each tag's first two bytes as a big-endian number: a row is watermarked when it is below the rate's
    share of ``2**FILTER_BITS``."""
    leading = np.frombuffer(b"".join(tags), np.uint8).reshape(-1, TAG_BYTES)[:, :2].astype(np.int64)
    return leading[:, 0] * 256 + leading[:, 1]


def watermark_label(tag: bytes, top_class: int, classes: int) -> int:
    """A wrong label picked by the digest bytes after the filter's: ``top + 1 + (tag mod (classes - 1))``,
    uniform over the ``classes - 1`` classes other than ``top_class`` (up to a 2^-64 modulo bias)."""
    offset = int.from_bytes(tag[2:10], "big") % (classes - 1)
    return (top_class + 1 + offset) % classes


def distinct_inputs(records: list[WatermarkRecord]) -> list[WatermarkRecord]:
    """The first record of each distinct input (same SHA-256 of the hashed bytes), in serving order."""
    first = {}
    for record in records:
        first.setdefault(record.digest, record)
    return list(first.values())


def verify(trials: list[WatermarkRecord], labels_of, classes: int) -> tuple[float | None, float, float]:
    """Agreement of ``labels_of`` with the watermark labels of ``trials`` (one per distinct input), the
    binomial tail ``p = P[X >= k]`` and ``-log2 p`` (finite where ``p`` underflows to 0).

    Under the null hypothesis (a model never trained on the watermarked answers) the label is a keyed
    uniform draw among the ``classes - 1`` classes other than the victim's top-1, independent of the model,
    so the model matches it with probability ``P(model != victim top-1) / (classes - 1)``, at most
    ``1 / (classes - 1)``: the conservative chance used here. The trials must be distinct inputs: a model
    answers a repeated input the same way, so repeats are not independent. ``(None, 1.0, 0.0)`` when nothing
    was marked.
    """
    from scipy import stats  # imported when ownership is verified: it costs about a second per process

    if not trials:
        return None, 1.0, 0.0
    inputs = np.stack([record.input for record in trials])
    expected = np.array([record.label for record in trials])
    matches = int(np.sum(np.asarray(labels_of(inputs)) == expected))
    chance = 1.0 / (classes - 1)
    p_value = float(stats.binom.sf(matches - 1, len(trials), chance))
    return matches / len(trials), p_value, binomial_tail_bits(matches, len(trials), chance)


def binomial_tail_bits(successes: int, trials: int, chance: float) -> float:
    """``-log2 P[X >= successes]`` for ``X ~ Binomial(trials, chance)``, summed in log space so that it stays
    finite where the tail itself underflows float64 (scipy's ``binom.logsf`` returns -inf there)."""
    from scipy import special, stats

    if successes <= 0:
        return 0.0
    log_terms = stats.binom.logpmf(np.arange(successes, trials + 1), trials, chance)
    return max(0.0, -float(special.logsumexp(log_terms)) / math.log(2))


def _is_finite_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
