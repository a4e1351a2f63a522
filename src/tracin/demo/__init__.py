"""`tracin demo`: find mislabelled digits with TracIn self-influence, end to end.

Trains a small MLP on scikit-learn's digits with a fraction of training labels flipped, saving
checkpoints with their learning rates, on NumPy (the default: exact per-example gradients in a few
lines, nothing to install beyond the demo extra), JAX or PyTorch (through tracin.jax / tracin.torch);
writes the per-example gradients as gradient stores grads/train and grads/test; ranks training
examples by self-influence against loss ranking, random and perfect inspection; shows proponents and
opponents of a few test digits; writes figures, a report and the ranking, and prints the `tracin`
commands to run next on the stores. Needs the `demo` extra (scikit-learn, matplotlib, tqdm).
"""

from .run import DemoConfig, DemoResult, run_demo

__all__ = ["DemoConfig", "DemoResult", "run_demo"]
