"""PyTorch adapter: per-example gradients at each checkpoint, ready for tracin's scoring functions.

    grads = tracin.torch.export_gradients(model, [(ckpt_path, lr), ...], (x, y),
                                          nn.CrossEntropyLoss(reduction="none"))

Needs the `torch` extra (torch, tqdm).
"""

try:
    import torch as _torch  # noqa: F401
except ModuleNotFoundError as e:
    if e.name != "torch":
        raise
    raise ModuleNotFoundError(
        "tracin.torch needs PyTorch: pip install 'tracin[torch]' (on Linux without a GPU, first the CPU build: "
        "pip install torch --index-url https://download.pytorch.org/whl/cpu)",
        name="torch",
    ) from e

from .export import export_gradients

__all__ = ["export_gradients"]
