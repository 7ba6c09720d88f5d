"""Packing short fine-tuning examples into one row without cross-example attention: positions
restart at 0 for each example and attention is block-diagonal causal, so a packed example's
logits, loss and gradients are those it has alone."""
import pytest
import torch

from plinth.adapt.classify import Finetuned
from plinth.adapt.examples import Example, collate, pack
from plinth.adapt.finetune import FinetuneRecipe
from plinth.errors import PlinthError
from plinth.loss import IGNORE
from plinth.model import Positions, positions_in_documents
from tests.conftest import tiny_model


def examples(lengths=(5, 9, 3, 12, 7, 4), seed=0) -> list[Example]:
    """Random token rows; the loss counts every other position, as a masked prompt would leave it."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for n in lengths:
        tokens = torch.randint(0, 259, (n + 1,), generator=g).tolist()
        rows.append(Example(tokens[:-1], [t if i % 2 else IGNORE for i, t in enumerate(tokens[1:])]))
    return rows


def test_positions_restart_with_each_document():
    documents = torch.tensor([[0, 0, 0, 1, 1, 2, -1, -1], [0, 0, 0, 0, 0, 0, 0, 0]])
    assert positions_in_documents(documents).tolist() == [[0, 1, 2, 0, 1, 0, 0, 1], list(range(8))]


def test_pack_fills_rows_and_numbers_the_examples():
    rows = pack(examples(), length=16)
    assert [len(r.tokens) for r in rows] == [14, 15, 11]  # 5+9 | 3+12 | 7+4
    assert rows[0].documents == [0] * 5 + [1] * 9 and rows[2].documents == [0] * 7 + [1] * 4
    assert [t for r in rows for t in r.targets] == [t for e in examples() for t in e.targets]
    x, y = collate(rows)
    assert x.shape == (3, 2, 15) and y.shape == (3, 15) and x[2, :, 11:].eq(-1).all()


def split_by_example(packed: torch.Tensor, rows: list[Example]) -> list[torch.Tensor]:
    """Per-position outputs (rows, T, ...) of packed rows → one tensor per example, in packing order."""
    return [packed[i, :len(r.tokens)][torch.tensor(r.documents) == number]
            for i, r in enumerate(rows) for number in range(r.documents[-1] + 1)]


@pytest.mark.parametrize("overrides", [{}, {"sliding_window": 4, "global_every": 2}, {"position": "learned"}],
                         ids=["rope", "sliding-window", "learned-positions"])
def test_each_packed_example_has_the_logits_it_has_alone(overrides):
    model = Finetuned(tiny_model(**overrides))
    alone, rows = examples(), pack(examples(), length=16)
    with torch.no_grad():
        packed = split_by_example(model(collate(rows)[0]), rows)
        assert len(packed) == len(alone)
        for logits, e in zip(packed, alone):
            torch.testing.assert_close(logits, model.backbone(torch.tensor([e.tokens]))[0], rtol=1e-4, atol=1e-5)


def test_packed_training_loss_and_gradients_equal_unpacked():
    """The training path (target positions only): the same loss and gradients as one example per row."""
    model = Finetuned(tiny_model())
    grads, losses = [], []
    for batch in (collate(examples()), collate(pack(examples(), length=16))):
        model.zero_grad()
        loss = model(batch[0], targets=batch[1])
        loss.backward()
        losses.append(float(loss.detach()))
        grads.append([p.grad.clone() for p in model.parameters()])
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    for unpacked, packed in zip(*grads):
        torch.testing.assert_close(packed, unpacked, rtol=1e-4, atol=1e-6)


def test_unpacked_rows_keep_the_plain_causal_kernel():
    """No documents, no mask: unpacked training runs SDPA's is_causal path exactly as before."""
    plain = Positions(2, 8, 0, "cpu")
    assert plain.whole(None) and plain.q_pos[0].tolist() == list(range(8))
    packed = Positions(1, 4, 0, "cpu", documents=torch.tensor([[0, 0, 1, 1]]))
    assert not packed.whole(None)
    assert packed.mask(True, None)[0, 0].int().tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]]


def test_packing_a_head_task_is_an_error():
    with pytest.raises(PlinthError, match="pack=true joins language-model examples"):
        FinetuneRecipe(task="classify", method="probe", pack=True)
