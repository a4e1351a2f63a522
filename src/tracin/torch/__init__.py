"""PyTorch adapter: per-example gradients at each checkpoint, ready for tracin's scoring functions.

    grads = tracin.torch.export_gradients(model, [(ckpt_path, lr), ...], (x, y),
                                          nn.CrossEntropyLoss(reduction="none"))

Needs the `torch` extra (torch, tqdm).
"""

from .export import export_gradients

__all__ = ["export_gradients"]
