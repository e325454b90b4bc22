import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from heistlab import progress
from heistlab.api import Oracle, QueryRefused


@pytest.fixture
def terminal(monkeypatch):
    """stderr (captured) claims to be a terminal; CI and the override are unset."""
    monkeypatch.setattr(progress, "stderr_is_terminal", lambda: True)
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.delenv(progress.FORCE_VARIABLE, raising=False)
    return monkeypatch


def count_to_ten() -> None:
    with progress.counter("queries served", 10) as advance, progress.phase("running knockoff"):
        for _ in range(5):
            advance(2)


def test_shown_on_a_terminal_and_quiet_under_ci(terminal, capsys):
    assert progress.interactive()
    terminal.setenv("CI", "true")
    assert not progress.interactive()
    count_to_ten()
    assert capsys.readouterr().err == ""


def test_quiet_when_stderr_is_not_a_terminal(monkeypatch, capsys):
    monkeypatch.setattr(progress, "stderr_is_terminal", lambda: False)
    monkeypatch.delenv(progress.FORCE_VARIABLE, raising=False)
    count_to_ten()
    assert capsys.readouterr().err == ""


def test_forced_on_renders_the_count_of_the_total(terminal, capsys):
    terminal.setenv("CI", "true")
    terminal.setenv(progress.FORCE_VARIABLE, "1")
    count_to_ten()
    shown = capsys.readouterr().err
    assert "queries served" in shown and "10/10" in shown and "running knockoff" in shown
    assert progress._Display.progress is None  # the live display was stopped with its last task


def test_forced_off_wins_over_a_terminal(terminal, capsys):
    terminal.setenv(progress.FORCE_VARIABLE, "0")
    count_to_ten()
    assert capsys.readouterr().err == ""


def test_phase_time_is_taken_after_the_device_finished(caplog):
    @jax.jit
    def work(x):
        return jax.lax.fori_loop(0, 50, lambda _, y: jnp.tanh(y @ y.T), x)

    x = jnp.ones((256, 256)) / 256
    work(x).block_until_ready()  # compiled outside the phase
    with caplog.at_level(logging.INFO, logger="heistlab"), progress.phase("working") as ready:
        result = ready(work(x))
    assert result.is_ready()
    assert [record.getMessage().split(":")[0] for record in caplog.records] == ["working"]


def test_counting_oracle_counts_served_rows_only():
    left = [5]

    def answer(inputs):
        if len(inputs) > left[0]:
            raise QueryRefused("attacker", len(inputs), left[0], "budget")
        left[0] -= len(inputs)
        return np.full((len(inputs), 3), 1 / 3, np.float32)

    oracle = Oracle(answer, lambda: left[0], (2,), 3, "probabilities")
    counted = []
    wrapped = progress.counting_oracle(oracle, counted.append)
    wrapped.query(np.zeros((3, 2), np.float32))
    with pytest.raises(QueryRefused):
        wrapped.query(np.zeros((4, 2), np.float32))
    assert counted == [3] and wrapped.remaining == 2
    assert (wrapped.input_shape, wrapped.num_classes, wrapped.output) == ((2,), 3, "probabilities")


@pytest.mark.slow
@pytest.mark.parametrize("family", ["mlp", "cnn_stepped"])
def test_training_counts_its_epochs_and_learns_the_same_parameters(family, terminal, capsys):
    """A compiled training loop (MLP) reports each epoch from the device; a stepped one (a CNN on 24x24
    images) from Python. The parameters are those of the same training without a bar."""
    from heistlab import models, training

    shape = (8, 8, 1) if family == "mlp" else (24, 24, 1)
    model = models.MLP(3, (8,)) if family == "mlp" else models.CNN(3, (4,), 8)
    assert models.trains_in_compiled_loop(model, shape) == (family == "mlp")
    rng = np.random.default_rng(0)
    inputs = rng.uniform(size=(40, *shape)).astype(np.float32)
    targets = np.eye(3, dtype=np.float32)[rng.integers(0, 3, 40)]
    config = training.TrainConfig(epochs=3, batch_size=16, learning_rate=0.01)
    terminal.setenv(progress.FORCE_VARIABLE, "0")
    quiet = training.train_classifier(model, inputs, targets, jax.random.key(1), config)
    terminal.setenv(progress.FORCE_VARIABLE, "1")
    shown = training.train_classifier(model, inputs, targets, jax.random.key(1), config)
    rendered = capsys.readouterr().err
    assert "epochs" in rendered and "3/3" in rendered
    for left, right in zip(jax.tree.leaves(quiet), jax.tree.leaves(shown), strict=True):
        np.testing.assert_array_equal(np.asarray(left), np.asarray(right))
