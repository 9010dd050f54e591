"""The learning rate as a plain function of the iteration: linear warmup from 0, then x0.1 steps."""
from typing import Sequence


def learning_rate(iteration: int, base_lr: float, warmup_iters: int, drop_iters: Sequence[int],
                  gamma: float = 0.1) -> float:
    """lr = base_lr * warm * gamma^(number of drop_iters <= iteration), with warm = iteration / warmup_iters
    during the warmup (so iteration 0 has lr 0) and 1 after it. Iterations count from 0 over the stage."""
    warm = iteration / warmup_iters if iteration < warmup_iters else 1.0
    drops = sum(1 for boundary in drop_iters if iteration >= boundary)
    return base_lr * warm * gamma ** drops
