"""The fast gradient sign method (Goodfellow et al., "Explaining and Harnessing Adversarial Examples", ICLR
2015), white-box on the stolen surrogate, then transferred to the victim through the API.

One step of size epsilon along the sign of the surrogate's loss gradient (L-inf), or along its unit direction
(L2, the fast gradient method), clipped to [0, 1]: PGD with one step, no random start. Papernot et al. (2017)
transfer FGSM examples crafted on a JBDA substitute at epsilon 0.3.
"""

from __future__ import annotations

import functools

from heistlab.attacks.evasion.base import TRANSFER, Evasion, check_count, check_norm, check_positive
from heistlab.attacks.evasion.pgd import projected_gradient_descent


def fgsm(epsilon: float = 0.3, norm: str = "linf", count: int = 1000, query_batch: int = 256) -> Evasion:
    """Builds FGSM (``norm='linf'``) or the L2 fast gradient method with perturbation size ``epsilon``."""
    epsilon = check_positive("fgsm", "epsilon", epsilon)
    check_norm("fgsm", norm)
    check_count("fgsm", "count", count)
    check_count("fgsm", "query_batch", query_batch)
    craft = functools.partial(
        projected_gradient_descent,
        epsilon=epsilon,
        step_size=epsilon,
        steps=1,
        norm=norm,
        use_random_start=False,
    )
    return Evasion("fgsm", TRANSFER, count, 1, norm, epsilon, query_batch, craft)
