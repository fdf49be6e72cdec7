"""The slot adapter: frozen given A, zero-init B, the off switch, the one trainable token row."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from blockctl.adapter import token_key, up_key
from blockctl.blocks import make_basis, slot_down
from blockctl.errors import InvalidInput
from blockctl.layout import layout_of, load_basis
from blockctl.train.components import load_components
from blockctl.train.slot_adapter import (
    SlotLinear,
    TokenEmbedding,
    attach,
    freeze,
    vocabulary_norms,
)
from registry import Registry


def _linear(d_in: int = 8, d_out: int = 6) -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(d_in, d_out)


def test_slot_linear_starts_at_the_base_and_applies_scale_b_a() -> None:
    base = _linear()
    down = slot_down(make_basis(8, 0), 1, 2)
    layer = SlotLinear(base, down, scale=0.5)
    x = torch.randn(3, 8)
    assert torch.equal(layer(x), base(x))  # B starts at zero
    with torch.no_grad():
        layer.up.normal_()
    expected = base(x) + 0.5 * x @ (layer.up @ down).T
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)
    layer.enabled = False
    assert torch.equal(layer(x), base(x))


def test_slot_linear_update_stays_in_its_slot() -> None:
    basis = make_basis(8, 3)
    layer = SlotLinear(_linear(), slot_down(basis, 0, 2), scale=1.0)
    with torch.no_grad():
        layer.up.normal_()
    other = slot_down(basis, 2, 2)  # inputs in another slot's subspace are left alone
    x = torch.randn(4, 2) @ other
    torch.testing.assert_close(layer(x), layer.base(x), rtol=0, atol=1e-5)


def test_slot_linear_has_only_b_trainable() -> None:
    layer = SlotLinear(_linear(), slot_down(make_basis(8, 0), 0, 2), 1.0)
    freeze(layer.base)
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["up"]
    assert "down" in dict(layer.named_buffers())


def test_slot_linear_rejects_a_basis_of_the_wrong_width() -> None:
    with pytest.raises(InvalidInput, match="wide"):
        SlotLinear(_linear(), slot_down(make_basis(4, 0), 0, 2), 1.0)


def test_token_embedding_changes_only_the_new_row() -> None:
    base = nn.Embedding(10, 4)
    freeze(base)
    init = base.weight[3].clone()
    emb = TokenEmbedding(base, token_id=10, init=init)  # id past the frozen matrix
    ids = torch.tensor([[1, 10, 2, 10]])
    out = emb(ids)
    torch.testing.assert_close(out[0, 1], init)
    torch.testing.assert_close(out[0, 0], base.weight[1])
    out.sum().backward()
    assert base.weight.grad is None
    assert emb.row.grad is not None and torch.equal(emb.row.grad, torch.full((1, 4), 2.0))
    with torch.no_grad():
        emb.row.add_(1.0)
    emb.enabled = False  # "before training": the class word's embedding again
    torch.testing.assert_close(emb(ids)[0, 1], init)


def test_attach_on_the_tiny_base_trains_only_b_blocks_and_the_token_row(
    tiny_registry: Registry, tiny_base: Path
) -> None:
    layout = layout_of(tiny_registry)
    comps = load_components(tiny_base)
    freeze(comps.unet, comps.text_encoder, comps.vae)
    bases = load_basis(tiny_registry.basis_path(), layout)
    adapter = attach(comps.modules(), layout, bases, 1, comps.tokenizer, "<rex>", "dog")
    trainable = [
        p
        for m in (comps.unet, comps.text_encoder, comps.vae)
        for p in m.parameters()
        if p.requires_grad
    ]
    assert len(trainable) == len(layout.targets) + 1
    assert set(adapter.slots) == {t.name for t in layout.targets}
    class_ids = comps.tokenizer("dog", add_special_tokens=False).input_ids
    weight = adapter.embedding.base.weight
    torch.testing.assert_close(adapter.embedding.row[0], weight[class_ids].mean(0))
    tensors = adapter.state_tensors()
    assert set(tensors) == {up_key(t.name) for t in layout.targets} | {token_key("<rex>")}
    assert all(float(tensors[up_key(t.name)].abs().max()) == 0 for t in layout.targets)
    ids = comps.tokenizer("a photo of <rex> dog", return_tensors="pt").input_ids
    assert adapter.embedding.token_id in ids[0].tolist()  # the token is one piece


def test_attach_reaches_text_encoder_targets(tiny_base: Path, tmp_path: Path) -> None:
    from tests.conftest import create_registry

    reg = create_registry(tmp_path / "r", tiny_base, text_encoder=True)
    layout = layout_of(reg)
    comps = load_components(tiny_base)
    freeze(comps.unet, comps.text_encoder, comps.vae)
    adapter = attach(
        comps.modules(),
        layout,
        load_basis(reg.basis_path(), layout),
        0,
        comps.tokenizer,
        "<cat1>",
        "cat",
    )
    text = [n for n in adapter.slots if n.startswith("text_encoder.")]
    assert text and all(isinstance(adapter.slots[n], SlotLinear) for n in text)
    wrapped = [m for m in comps.text_encoder.modules() if isinstance(m, SlotLinear)]
    assert len(wrapped) == len(text)


def test_scratch_rows_stand_in_for_ids_after_the_token_and_never_train() -> None:
    base = nn.Embedding(10, 4)
    freeze(base)
    emb = TokenEmbedding(base, token_id=10, init=base.weight[3].clone())
    rows = torch.randn(2, 4)
    emb.set_scratch(rows)
    out = emb(torch.tensor([[11, 10, 12, 5]]))
    torch.testing.assert_close(out[0, 0], rows[0])
    torch.testing.assert_close(out[0, 2], rows[1])
    torch.testing.assert_close(out[0, 3], base.weight[5])
    out[0, 0].sum().backward()
    assert emb.row.grad is None or float(emb.row.grad.abs().max()) == 0.0
    emb.set_scratch(None)
    assert emb.scratch.shape == (0, 4)
    with pytest.raises(InvalidInput, match="inside the frozen vocabulary"):
        TokenEmbedding(base, token_id=9, init=base.weight[3])


def test_norm_bound_projects_the_row_back_after_a_step() -> None:
    base = nn.Embedding(10, 4)
    norms = vocabulary_norms(base.weight)
    assert norms.smallest <= norms.median <= norms.largest
    emb = TokenEmbedding(base, token_id=10, init=base.weight[3].clone(), max_norm=0.5)
    with torch.no_grad():
        emb.row.copy_(torch.tensor([[3.0, 4.0, 0.0, 0.0]]))
    emb.project_()
    torch.testing.assert_close(emb.row, torch.tensor([[0.3, 0.4, 0.0, 0.0]]))
    emb.project_()  # inside the ball: unchanged
    torch.testing.assert_close(emb.row, torch.tensor([[0.3, 0.4, 0.0, 0.0]]))
    free = TokenEmbedding(base, token_id=10, init=torch.full((4,), 9.0))
    free.project_()
    assert float(free.row.detach().norm()) == pytest.approx(18.0)
