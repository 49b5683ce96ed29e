"""Second-order MAML on 5-shot sine regression with the functional API only (no CLI).

    python examples/sine_maml_api.py --steps 2000

Shows the pieces composing: explicit keys, a pure optimizer whose state is a pytree,
``maml_outer`` over a vmapped task batch, and ``mx.compile`` of the whole meta-step.
"""

import argparse

import metafn  # first: loads a fast BLAS before MLX
import mlx.core as mx

from metafn import optim
from metafn.random import fold_in, key


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    args = parser.parse_args()

    family = metafn.tasks.sine()
    loss_fn = metafn.losses.mse_loss(metafn.nn.mlp_apply)
    params = metafn.nn.mlp_init(key(0), [1, 40, 40, 1])
    opt = optim.adam(1e-3)
    opt_state = opt.init(params)

    @mx.compile
    def meta_step(params, opt_state, episodes):
        loss, grads = metafn.maml_outer(loss_fn, params, episodes, inner_lr=0.01, steps=1)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optim.apply_updates(params, updates), opt_state, loss

    for step in range(args.steps):
        episodes = metafn.sample_episodes(fold_in(key(1), step), family, 25, k_shot=5, n_query=10)
        params, opt_state, loss = meta_step(params, opt_state, episodes)
        mx.eval(params, opt_state, loss)
        if step % 500 == 0 or step == args.steps - 1:
            print(f"step {step:5d}  meta-loss {loss.item():.3f}")

    test = metafn.sample_episodes(key(2), family, 500, k_shot=5, n_query=10, split="test")
    for steps in (0, 1, 10):
        adapted = metafn.batched_adapt(
            loss_fn, metafn.tree.tree_broadcast(params, 500), test.support_x, test.support_y, steps, 0.01
        )
        query = mx.mean(metafn.vmap_tasks(loss_fn).fn(adapted, test.query_x, test.query_y))
        print(f"test MSE after {steps:2d} steps: {query.item():.3f}")


if __name__ == "__main__":
    main()
