"""Training losses, summed over the targets that count (the training loop divides by the step's count)."""
from __future__ import annotations

import torch.nn.functional as F

IGNORE = -100  # target id that takes no part in the loss (padding, masked prompt tokens)


def summed_loss(scores, targets):
    """The loss of scores against targets, summed. The targets say which loss: token or class ids
    → cross-entropy (IGNORE takes no part); float numbers → squared error (a regression head)."""
    if targets.is_floating_point():
        return F.mse_loss(scores.float(), targets, reduction="sum")
    return F.cross_entropy(scores.float(), targets, ignore_index=IGNORE, reduction="sum")
