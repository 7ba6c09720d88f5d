"""The training loss as the loop asks for it, `model(inputs, targets=targets)`: the summed
cross-entropy of the model's logits, with PyTorch's cross-entropy over the returned logits as
the reference."""
import pytest
import torch
import torch.nn.functional as F

from plinth.loss import IGNORE
from tests.conftest import tiny_model


@pytest.mark.parametrize("softcap", [None, 3.0])
def test_model_forward_with_targets_is_the_summed_loss_of_its_logits(softcap):
    model = tiny_model(final_softcap=softcap).train()
    tokens = torch.randint(0, 259, (2, 12), generator=torch.Generator().manual_seed(1))
    targets = tokens.roll(-1, dims=1)
    targets[:, -1] = IGNORE
    results = []
    for through_forward in (True, False):
        model.zero_grad()
        if through_forward:
            total = model(tokens, targets=targets)
        else:
            logits = model(tokens).flatten(0, 1)
            total = F.cross_entropy(logits, targets.flatten(), ignore_index=IGNORE, reduction="sum")
        total.backward()
        results.append((float(total.detach()), [p.grad.clone() for p in model.parameters()]))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-6)
    with torch.no_grad():  # the mean over the 22 counted targets, computed without IGNORE
        mean = F.cross_entropy(model(tokens)[:, :-1].flatten(0, 1), targets[:, :-1].flatten())
    assert results[0][0] == pytest.approx(22 * float(mean), rel=1e-5)
    for got, want in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(got, want)
