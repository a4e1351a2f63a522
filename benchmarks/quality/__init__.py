"""Attribution quality against ground truth: mislabel detection and the linear datamodeling score.

    python -m benchmarks.quality [--quick] [--out DIR] [--cache DIR]

Small MLPs are trained with SGD on datasets that ship with scikit-learn; every attribution method
(tracin recipes, loss/margin baselines, Captum and TRAK where installed) is scored side by side.
Methods live in benchmarks/quality/methods.py: adding one is one decorated function.
"""
