"""``Composer(mode="branch")``: the same predictions as fuse mode, switching by mask, the base's
module graph and weights after ``restore``, its input cache, and what it refuses.

Tolerance: on the float32 tiny base, branch and fuse mode differ only in where the low-rank
product is rounded (into the weight, or added to the layer's output), a few float32 ulps:
``assert_close`` with rtol = atol = 1e-5 (outputs are of order 1; measured differences about
1e-6). In float16/bfloat16 the rounding of the weight itself differs: 2e-2 / 8e-2 there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from blockctl.compose import Composer, compose
from blockctl.errors import InvalidInput, ValidationFailed
from blockctl.layout import layout_of, sha256_file
from blockctl.sample import load_pipeline
from blockctl.slot_branch import BranchLinear
from registry import Registry
from tests.conftest import create_registry, write_random_adapter
from tests.support.registries import make_published

PROMPT = "<rex> a <vangogh> <tabby>"  # the tiny text encoder reads 32 characters
FLOAT32 = {"rtol": 1e-5, "atol": 1e-5}


@pytest.fixture(scope="module")
def reg(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Registry:
    # Text-encoder targets too: branch mode takes them (they read text as well).
    return make_published(tmp_path_factory.mktemp("branch"), tiny_base)


@pytest.fixture
def pipe(tiny_base: Path) -> Any:
    return load_pipeline(tiny_base)


def encode(pipe: Any, prompt: str = PROMPT) -> torch.Tensor:
    tok = pipe.tokenizer
    ids = tok(
        [prompt], padding="max_length", truncation=True, max_length=tok.model_max_length,
        return_tensors="pt",
    )  # fmt: skip
    with torch.no_grad():
        return pipe.text_encoder(ids.input_ids.to(pipe.device))[0]


def predict(pipe: Any, prompt: str = PROMPT) -> torch.Tensor:
    """The text encoding and one UNet noise prediction on fixed latents, flattened."""
    ctx = encode(pipe, prompt)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, pipe.unet.config.in_channels, 8, 8, generator=gen)
    with torch.no_grad():
        eps = pipe.unet(x.to(ctx.device, ctx.dtype), 10, torch.cat([ctx, ctx])).sample
    return torch.cat([ctx.flatten(), eps.flatten()]).float()


def modules_of(pipe: Any) -> dict[str, Any]:
    named = {f"unet.{k}": m for k, m in pipe.unet.named_modules()}
    return named | {f"text.{k}": m for k, m in pipe.text_encoder.named_modules()}


def tensors_of(pipe: Any) -> dict[str, torch.Tensor]:
    state = {f"unet.{k}": v for k, v in pipe.unet.state_dict(keep_vars=True).items()}
    return state | {f"text.{k}": v for k, v in pipe.text_encoder.state_dict(keep_vars=True).items()}


def fused(pipe: Any, reg: Registry, concepts: list[str], scales: dict[str, float]) -> torch.Tensor:
    with compose(pipe, reg, concepts, scales):
        return predict(pipe)


def test_branch_predicts_what_fuse_does(reg: Registry, pipe: Any) -> None:
    scales = {"rex": 0.7, "vangogh": -0.5}
    want = fused(pipe, reg, ["rex", "vangogh"], scales)
    with compose(pipe, reg, ["vangogh", "rex"], scales, mode="branch"):
        got = predict(pipe)
    torch.testing.assert_close(got, want, **FLOAT32)
    assert not torch.allclose(predict(pipe), want, **FLOAT32)  # the concepts do change it


def test_a_whole_pipeline_call_matches_fuse_mode(reg: Registry, pipe: Any) -> None:
    """Guidance doubles the batch; the branch sees the same prompt encoding at every step."""

    def image() -> Any:
        gen = torch.Generator().manual_seed(3)
        run = pipe(
            PROMPT, height=32, width=32, num_inference_steps=3, generator=gen, output_type="np"
        )
        return torch.from_numpy(run.images)

    with compose(pipe, reg, ["rex", "tabby"]):
        want = image()
    with compose(pipe, reg, ["rex", "tabby"], mode="branch"):
        got = image()
    torch.testing.assert_close(got, want, **FLOAT32)


def test_switching_between_subsets(reg: Registry, pipe: Any) -> None:
    expected = {
        ("rex",): fused(pipe, reg, ["rex"], {}),
        ("tabby", "vangogh"): fused(pipe, reg, ["tabby", "vangogh"], {"tabby": 2.0}),
    }
    composer = Composer(pipe, reg, mode="branch")
    composer.load(["rex", "tabby", "vangogh"])
    composer.set(["rex"])
    first = predict(pipe)
    torch.testing.assert_close(first, expected[("rex",)], **FLOAT32)
    composer.set(["tabby", "vangogh"], {"tabby": 2.0})
    assert composer.active == {"tabby": 2.0, "vangogh": 1.0}
    torch.testing.assert_close(predict(pipe), expected[("tabby", "vangogh")], **FLOAT32)
    ids = pipe.tokenizer.convert_tokens_to_ids(["<tabby>", "<vangogh>"])
    assert ids == [len(pipe.tokenizer) - 2, len(pipe.tokenizer) - 1]  # as a merged folder has them
    composer.set(["rex"])
    assert torch.equal(predict(pipe), first)  # the same bank and mask: the same arithmetic
    composer.set([])
    assert composer.active == {}
    assert not any(isinstance(m, BranchLinear) for m in modules_of(pipe).values())


def test_loading_more_concepts_leaves_the_active_ones(reg: Registry, pipe: Any) -> None:
    want = fused(pipe, reg, ["vangogh"], {"vangogh": 0.5})
    composer = Composer(pipe, reg, mode="branch")
    composer.set(["vangogh"], {"vangogh": 0.5})
    composer.load(["rex", "tabby"])  # new columns in every branch, masked off
    torch.testing.assert_close(predict(pipe), want, **FLOAT32)
    assert composer.active == {"vangogh": 0.5}
    composer.restore()


def test_restore_gives_back_the_base_graph_and_weights(reg: Registry, pipe: Any) -> None:
    modules, tensors, tokenizer = modules_of(pipe), tensors_of(pipe), pipe.tokenizer
    values = {k: v.detach().clone() for k, v in tensors.items()}
    composer = Composer(pipe, reg, mode="branch")
    composer.set(["rex", "tabby"])
    wrapped = [name for name, m in modules_of(pipe).items() if isinstance(m, BranchLinear)]
    assert len(wrapped) == len(layout_of(reg).targets)
    for t in layout_of(reg).targets:  # while set: the weights are the very same, untouched
        part = pipe.unet if t.component == "unet" else pipe.text_encoder
        key = f"{'unet' if t.component == 'unet' else 'text'}.{t.module}.weight"
        assert part.get_submodule(t.module).weight is tensors[key]
        assert torch.equal(tensors[key], values[key])
    composer.set(["vangogh"])
    composer.restore()
    after = modules_of(pipe)
    assert after.keys() == modules.keys()
    assert all(after[k] is m for k, m in modules.items())  # the same objects, same places
    now = tensors_of(pipe)
    assert now.keys() == tensors.keys()
    for key, tensor in tensors.items():
        assert now[key] is tensor and torch.equal(tensor, values[key]), key
    assert pipe.tokenizer is tokenizer


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float16, 2e-2), (torch.bfloat16, 8e-2)])
def test_half_precision(reg: Registry, pipe: Any, dtype: torch.dtype, tol: float) -> None:
    pipe.to(dtype=dtype)
    want = fused(pipe, reg, ["rex", "tabby"], {"rex": 0.8})
    with compose(pipe, reg, ["rex", "tabby"], {"rex": 0.8}, mode="branch"):
        branch = next(m for m in modules_of(pipe).values() if isinstance(m, BranchLinear))
        bank = branch.bank
        assert bank.mask.dtype == dtype
        assert all(t.dtype == dtype for t in [*bank.downs.values(), *bank.ups.values()])
        got = predict(pipe)
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)


def test_the_input_cache_never_serves_stale_results(reg: Registry, pipe: Any) -> None:
    """One prompt encoding reused across calls (as a pipeline does across steps): a switch, or
    the tensor changed in place, must show in the next prediction."""
    composer = Composer(pipe, reg, mode="branch")
    composer.load(["rex", "tabby", "vangogh"])  # so that only the switch can invalidate
    composer.set(["rex", "tabby"])
    ctx = encode(pipe)
    x = torch.randn(
        1, pipe.unet.config.in_channels, 8, 8, generator=torch.Generator().manual_seed(1)
    )

    def eps(context: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return pipe.unet(x, 10, context).sample

    before = eps(ctx)
    composer.set(["vangogh"], {"vangogh": 3.0})
    assert torch.equal(eps(ctx), eps(ctx.clone()))
    assert not torch.allclose(eps(ctx), before)
    ctx.mul_(2.0)
    assert torch.equal(eps(ctx), eps(ctx.clone()))
    with torch.inference_mode():  # no version counter there: never cached
        frozen = ctx.clone()
        first = pipe.unet(x, 10, frozen).sample
        frozen.mul_(0.5)
        assert torch.equal(pipe.unet(x, 10, frozen).sample, pipe.unet(x, 10, frozen.clone()).sample)
        assert not torch.equal(pipe.unet(x, 10, frozen).sample, first)
    composer.restore()


def test_an_attn_layout_is_refused(tiny_base: Path, tmp_path: Path, pipe: Any) -> None:
    attn = make_published(tmp_path / "attn", tiny_base, ("rex",), preset="attn")
    with pytest.raises(InvalidInput, match=r"read only text.*attn1"):
        Composer(pipe, attn, mode="branch")
    with pytest.raises(InvalidInput, match="unknown compose mode 'lazy'"):
        Composer(pipe, attn, mode="lazy")
    with compose(pipe, attn, ["rex"]):  # fuse mode takes it
        pass


def test_a_foreign_adapter_is_refused(tiny_base: Path, tmp_path: Path, pipe: Any) -> None:
    home = make_published(tmp_path / "home", tiny_base, ("rex",), text_encoder=False)
    other = create_registry(tmp_path / "other", tiny_base, slots=2, rank=4)
    other.reserve("spy", "<spy>", "thing", "tester")
    foreign = write_random_adapter(other, "spy", tmp_path / "spy.safetensors")
    home.reserve("spy", "<spy>", "thing", "tester")
    home.publish("spy", foreign, sha256_file(foreign))  # stored without the CLI's checks
    modules, tensors = modules_of(pipe), tensors_of(pipe)
    composer = Composer(pipe, home, mode="branch")
    composer.set(["rex"])
    rex = predict(pipe)
    with pytest.raises(ValidationFailed, match="adapter of 'spy'"):
        composer.set(["rex", "spy"])
    assert composer.active == {"rex": 1.0}  # the refused switch changed nothing
    assert torch.equal(predict(pipe), rex)
    composer.restore()
    assert all(modules_of(pipe)[k] is m for k, m in modules.items())
    assert all(tensors_of(pipe)[k] is t for k, t in tensors.items())


def test_two_composers_on_one_pipeline_are_refused(reg: Registry, pipe: Any) -> None:
    first = Composer(pipe, reg, mode="branch")
    early = {mode: Composer(pipe, reg, mode=mode) for mode in ("fuse", "branch")}  # made before
    first.set(["rex"])
    rex = predict(pipe)
    for mode, other in early.items():
        with pytest.raises(ValidationFailed, match="already carries concepts"):
            Composer(pipe, reg, mode=mode)
        with pytest.raises(ValidationFailed, match="was replaced since the Composer was made"):
            other.set(["tabby"])
        other.restore()  # it has nothing set: the first's concepts stay
        assert other.active == {}
    assert first.active == {"rex": 1.0}
    assert torch.equal(predict(pipe), rex)
    first.restore()
    for other in early.values():
        other.set(["tabby"])  # free again
        other.restore()
