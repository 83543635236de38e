"""Partial FC's parts, behind ``partial_fc.PartialFC`` (the module users import):

- ``pfc.kernels``: the fused cosine + margin + softmax cross-entropy functions, their persistent
  workspace and the ``GradientSink`` the backward writes the center gradients into;
- ``pfc.storage``: reduced-precision row storage (bf16 / int8 with stochastic rounding);
- ``pfc.optim``: the row optimizer (SGD, Adam, AdamW; sparse or dense) and ``JointOptimizer``, one
  optimizer over the backbone and the head for the training loop.
"""


class PartialFCError(ValueError):
    """Bad Partial FC input or setting; the message is one line."""
