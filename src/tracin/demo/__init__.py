"""`tracin demo`: find mislabelled digits with TracIn self-influence, end to end.

Trains a small MLP on scikit-learn's digits with a fraction of training labels flipped, saving
checkpoints with their learning rates; exports per-example gradients with tracin.torch; ranks
training examples by self-influence; compares with loss ranking and random inspection; shows
proponents and opponents of a few test digits; writes figures, a report and the ranking.
Needs the `demo` extra (torch, scikit-learn, matplotlib, tqdm).
"""

from .run import DemoConfig, DemoResult, run_demo

__all__ = ["DemoConfig", "DemoResult", "run_demo"]
