import jax
import numpy as np
import pytest

from heistlab.api import Oracle
from heistlab.attacks.base import Surrogate
from heistlab.attacks.dfme import forward_difference_gradient, perturbed_points
from heistlab.attacks.maze import ReplayBuffer, kl_to_victim, maze, victim_log_probabilities
from heistlab.models import MLP
from heistlab.training import TrainConfig


class LabelOracle:
    """Serves labels only and counts the rows it serves."""

    served = 0

    def oracle(self):
        def answer(inputs):
            self.served += len(inputs)
            return np.zeros(len(inputs), np.int32)

        return Oracle(answer, lambda: None, (4, 4, 1), 5, "labels")


def test_replay_buffer_samples_what_was_stored_with_the_iteration_that_paid_for_it():
    buffer = ReplayBuffer()
    buffer.add(np.zeros((3, 2), np.float32), np.zeros((3, 5), np.float32), iteration=0)
    buffer.add(np.ones((2, 2), np.float32), np.ones((2, 5), np.float32), iteration=4)
    inputs, targets, paid_in = buffer.sample(jax.random.key(0), 200)
    assert len(buffer) == 5 and inputs.shape == (200, 2) and targets.shape == (200, 5)
    np.testing.assert_array_equal(paid_in, np.where(inputs[:, 0] == 1.0, 4, 0))
    assert set(paid_in) == {0, 4}


def test_zeroth_order_estimate_points_along_the_true_gradient():
    # A smooth function of 8 inputs; MAZE's estimate from 10 directions, averaged over 50 draws.
    rng = np.random.default_rng(0)
    weights, base = rng.normal(size=8), rng.normal(size=(1, 8))

    def smooth(points):
        return np.sin(points @ weights) + 0.5 * np.sum(points**2, axis=-1)

    true = np.cos(base @ weights)[:, None] * weights + base
    estimates = []
    for seed in range(50):
        units, stepped = perturbed_points(base, jax.random.key(seed), 10, 1e-3)
        estimates.append(forward_difference_gradient(smooth(base), smooth(stepped), units, 1e-3))
    single, mean = estimates[0][0], np.mean(estimates, axis=0)[0]

    def cosine(a, b):
        return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))

    assert cosine(single, true[0]) > 0.6
    assert cosine(mean, true[0]) > 0.98


def test_kl_is_zero_when_the_clone_matches_and_positive_otherwise():
    probs = np.array([[0.7, 0.2, 0.1]])
    log_probs = victim_log_probabilities(probs, 1e-8)
    assert abs(float(kl_to_victim(np.log(probs), log_probs)[0])) < 1e-6
    # By hand: KL((0.7, 0.2, 0.1) || uniform) = sum p log(3 p).
    expected = float(np.sum(probs * np.log(3 * probs)))
    np.testing.assert_allclose(kl_to_victim(np.zeros((1, 3)), log_probs), [expected], rtol=1e-5)


def test_label_only_api_is_refused_before_any_query():
    counting = LabelOracle()
    surrogate = Surrogate(MLP(num_classes=5, hidden=(16,)), TrainConfig(epochs=1))
    with pytest.raises(ValueError, match="maze needs probabilities .*api.output=labels"):
        maze(budget=200).run(counting.oracle(), None, surrogate, jax.random.key(0))
    assert counting.served == 0 and maze(budget=200).needs_scores


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: maze(budget=100), r"maze: budget=100 cannot pay .* 16 \* \(10 \+ 1\) \+ 16|budget >= 192"),
        (lambda: maze(directions=0), "maze: directions must be an integer >= 1, got 0"),
        (lambda: maze(replay_steps=-1), "maze: replay_steps must be an integer >= 0, got -1"),
        (lambda: maze(step=0.0), "maze: step must be a finite number > 0, got 0.0"),
        (lambda: maze(floor=2.0), r"maze: floor must be a number in \(0, 1\)"),
    ],
)
def test_bad_settings_are_refused_by_name(build, message):
    with pytest.raises(ValueError, match=message):
        build()
