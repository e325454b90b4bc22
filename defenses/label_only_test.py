import jax
import jax.numpy as jnp
import numpy as np

from heistlab.defenses.base import QueryContext
from heistlab.defenses.label_only import label_only


def test_serves_one_hot_of_the_argmax():
    probs = jnp.array([[0.2, 0.5, 0.3], [0.4, 0.4, 0.2], [0.0, 0.0, 1.0]], jnp.float32)
    context = QueryContext(inputs=jnp.zeros((3, 1)), key=jax.random.key(0))
    served, _ = label_only().apply(probs, label_only().init(), context)
    assert served.dtype == probs.dtype
    np.testing.assert_array_equal(served, [[0, 1, 0], [1, 0, 0], [0, 0, 1]])
