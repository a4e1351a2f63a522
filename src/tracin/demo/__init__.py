"""`tracin demo`: find mislabelled digits with TracIn self-influence, end to end.

Trains a small MLP on scikit-learn's digits with a fraction of training labels flipped, saving ten
checkpoints (one per epoch for fewer than ten epochs; TrainingConfig.checkpoints) with their learning
rates and the held-out accuracy after every epoch, on NumPy (the default: exact per-example gradients
in a few lines, nothing to install beyond the demo extra), JAX or PyTorch (through tracin.jax /
tracin.torch); traces the checkpoints up to the first one saved at or after the held-out peak
(tracin.demo.recipe), writing their per-example gradients as gradient stores grads/train and
grads/test; ranks training examples by self-influence against all checkpoints, loss ranking, random
and perfect inspection; plots each checkpoint's share of self-influence (tracin.report); shows
proponents and opponents of a few test digits; writes figures, a report and the ranking, and prints
the `tracin` commands to run next on the stores. Needs the `demo` extra (scikit-learn, matplotlib, tqdm).
"""

from .run import DemoConfig, DemoResult, run_demo

__all__ = ["DemoConfig", "DemoResult", "run_demo"]
