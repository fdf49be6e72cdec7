"""``blockctl.compose``: exact restore, switching between subsets, equality with the merge,
dtypes, refusal of foreign adapters and pipelines, and the lock; then branch mode: the same
predictions as fuse mode, switching by mask, the base's module graph and weights after
``restore``, its input cache, and what it refuses.

Branch mode's tolerance: on the float32 tiny base, branch and fuse mode differ only in where the
low-rank product is rounded (into the weight, or added to the layer's output), a few float32
ulps: ``assert_close`` with rtol = atol = 1e-5 (outputs are of order 1; measured differences
about 1e-6). In float16/bfloat16 the rounding of the weight itself differs: 2e-2 / 8e-2 there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from blockctl.apply import plan_deltas
from blockctl.compose import Composer, compose
from blockctl.errors import InvalidInput, SlotConflict, ValidationFailed
from blockctl.layout import layout_of, sha256_file
from blockctl.merge import MergeOptions, merge, plan_merge
from blockctl.sample import load_pipeline
from blockctl.slot_branch import BranchLinear
from registry import Registry
from tests.conftest import create_registry, write_random_adapter
from tests.support.registries import make_published

TOKEN_EMBEDDING = "embeddings.token_embedding.weight"
PROMPT = "<rex> a <vangogh> <tabby>"  # the tiny text encoder reads 32 characters
TOL = 1e-5  # branch vs fuse mode in float32 (module docstring)


@pytest.fixture(scope="module")
def reg(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Registry:
    # Text-encoder targets too, so both components' weights are switched.
    return make_published(tmp_path_factory.mktemp("compose"), tiny_base)


@pytest.fixture
def pipe(tiny_base: Path) -> Any:
    return load_pipeline(tiny_base)


def snapshot(pipe: Any) -> dict[str, torch.Tensor]:
    state = {f"unet.{k}": v.clone() for k, v in pipe.unet.state_dict().items()}
    state |= {f"text.{k}": v.clone() for k, v in pipe.text_encoder.state_dict().items()}
    return state


def assert_same(pipe: Any, before: dict[str, torch.Tensor]) -> None:
    after = snapshot(pipe)
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert after[key].dtype == value.dtype and torch.equal(after[key], value), key


def key_of(target: str) -> str:
    """The ``snapshot`` key of a layout target's weight."""
    component, module = target.split(".", 1)
    return f"{'unet' if component == 'unet' else 'text'}.{module}.weight"


def target_weights(pipe: Any, reg: Registry) -> dict[str, torch.Tensor]:
    parts = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
    return {
        t.name: parts[t.component].get_submodule(t.module).weight.detach().clone()
        for t in layout_of(reg).targets
    }


def test_restore_is_exact_and_touches_nothing_else(reg: Registry, pipe: Any) -> None:
    before, tokenizer = snapshot(pipe), pipe.tokenizer
    vocab = pipe.text_encoder.get_input_embeddings().weight.data_ptr()
    untouched = pipe.unet.conv_in.weight
    pointer = untouched.data_ptr()
    with compose(pipe, reg, ["rex", "tabby"], scales={"rex": 0.8}) as composed:
        assert composed is pipe
        assert pipe.tokenizer is not tokenizer
        changed = target_weights(pipe, reg)
        assert all(not torch.equal(w, before[key_of(name)]) for name, w in changed.items())
        assert untouched.data_ptr() == pointer
    assert_same(pipe, before)
    assert pipe.tokenizer is tokenizer
    assert pipe.text_encoder.get_input_embeddings().weight.data_ptr() == vocab  # the same tensor


def test_composed_model_is_the_merged_folder(reg: Registry, pipe: Any, tmp_path: Path) -> None:
    """Same weights, same embedding rows, same token ids as ``merge`` writes (fp32 base)."""
    from transformers import AutoTokenizer

    out = tmp_path / "merged"
    merge(reg, ["vangogh", "rex"], MergeOptions(out=out, scales={"vangogh": -0.5}))
    folder = {
        "unet": load_file(str(out / "unet/diffusion_pytorch_model.safetensors")),
        "text_encoder": load_file(str(out / "text_encoder/model.safetensors")),
    }
    with compose(pipe, reg, ["rex", "vangogh"], scales={"vangogh": -0.5}):
        for name, weight in target_weights(pipe, reg).items():
            component, module = name.split(".", 1)
            assert torch.equal(weight, folder[component][f"{module}.weight"]), name
        emb = pipe.text_encoder.get_input_embeddings().weight
        assert torch.equal(emb, folder["text_encoder"][TOKEN_EMBEDDING])
        merged_tok = AutoTokenizer.from_pretrained(str(out / "tokenizer"))
        prompt = "a <rex> and a <vangogh> and <tabby>"
        assert pipe.tokenizer(prompt).input_ids == merged_tok(prompt).input_ids


def test_switching_recomputes_from_the_originals(reg: Registry, pipe: Any, tiny_base: Path) -> None:
    before = snapshot(pipe)
    composer = Composer(pipe, reg)
    composer.set(["rex", "tabby", "vangogh"], {"tabby": 3.0})
    composer.set(["vangogh"], {"vangogh": 0.5})
    assert composer.active == {"vangogh": 0.5}
    switched = target_weights(pipe, reg)
    tokens = pipe.tokenizer.convert_tokens_to_ids(["<vangogh>"])
    composer.set([])
    assert_same(pipe, before)
    fresh = load_pipeline(tiny_base)
    with compose(fresh, reg, ["vangogh"], {"vangogh": 0.5}):
        direct = target_weights(fresh, reg)
        assert fresh.tokenizer.convert_tokens_to_ids(["<vangogh>"]) == tokens
    assert all(torch.equal(switched[k], direct[k]) for k in direct)
    composer.set(["tabby"])
    composer.restore()
    assert_same(pipe, before)
    assert composer.active == {}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(reg: Registry, pipe: Any, dtype: torch.dtype) -> None:
    pipe.to(dtype=dtype)
    before = snapshot(pipe)
    plan = plan_merge(reg, ["rex", "tabby"], {})
    with compose(pipe, reg, ["tabby", "rex"]):
        for t in plan.layout.targets:
            part = pipe.unet if t.component == "unet" else pipe.text_encoder
            weight = part.get_submodule(t.module).weight
            want = (before[key_of(t.name)].float() + plan.delta(t)).to(dtype)  # rounded once
            assert weight.dtype == dtype and torch.equal(weight, want), t.name
    assert_same(pipe, before)


def test_unknown_concepts_and_bad_requests(reg: Registry, pipe: Any) -> None:
    before = snapshot(pipe)
    composer = Composer(pipe, reg)
    with pytest.raises(SlotConflict, match="not published in this registry: ghost"):
        composer.set(["rex", "ghost"])
    with pytest.raises(InvalidInput, match="more than once"):
        composer.set(["rex", "rex"])
    with pytest.raises(InvalidInput, match="not being merged"):
        composer.set(["rex"], {"tabby": 2.0})
    with pytest.raises(InvalidInput, match="finite"):
        composer.set(["rex"], {"rex": float("nan")})
    with pytest.raises(InvalidInput, match="not the string"):
        composer.set("rex")
    assert_same(pipe, before)


@pytest.mark.parametrize("mode", ["fuse", "branch"])
def test_a_foreign_adapter_is_refused(
    tiny_base: Path, tmp_path: Path, pipe: Any, mode: str
) -> None:
    home = make_published(tmp_path / "home", tiny_base, ("rex",), text_encoder=False)
    other = create_registry(tmp_path / "other", tiny_base, slots=2, rank=4)
    other.reserve("spy", "<spy>", "thing", "tester")
    foreign = write_random_adapter(other, "spy", tmp_path / "spy.safetensors")
    home.reserve("spy", "<spy>", "thing", "tester")
    home.publish("spy", foreign, sha256_file(foreign))  # stored without the CLI's checks
    before = snapshot(pipe)
    composer = Composer(pipe, home, mode=mode)
    composer.set(["rex"])
    during, tokenizer = snapshot(pipe), pipe.tokenizer
    with pytest.raises(ValidationFailed, match="adapter of 'spy'"):
        composer.set(["rex", "spy"])
    assert composer.active == {"rex": 1.0}  # the refused switch changed nothing
    assert_same(pipe, during)
    assert pipe.tokenizer is tokenizer
    composer.restore()
    assert_same(pipe, before)


def test_a_pipeline_that_is_not_the_base_is_refused(reg: Registry, tmp_path: Path) -> None:
    from blockctl.toy.model import TINY, build_pipeline, save_pipeline

    other = load_pipeline(save_pipeline(build_pipeline(TINY, seed=1), tmp_path / "other"))
    with pytest.raises(ValidationFailed, match="not the registry's base"):
        Composer(other, reg)
    with pytest.raises(InvalidInput, match="needs a Stable Diffusion pipeline"):
        Composer(object(), reg)


def test_a_second_composer_on_a_composed_pipeline_is_refused(reg: Registry, pipe: Any) -> None:
    with compose(pipe, reg, ["rex"]), pytest.raises(ValidationFailed, match="already fused"):
        Composer(pipe, reg)


def test_a_token_the_base_already_has_is_refused_cleanly(tiny_base: Path, tmp_path: Path) -> None:
    reg = create_registry(tmp_path / "r", tiny_base)
    for concept, token in (("rex", "<rex>"), ("plain", "a")):  # "a" is in the base vocabulary
        reg.reserve(concept, token, "thing", "tester")
        path = write_random_adapter(reg, concept, tmp_path / f"{concept}.safetensors")
        reg.publish(concept, path, sha256_file(path))
    pipe = load_pipeline(tiny_base)
    before, tokenizer = snapshot(pipe), pipe.tokenizer
    composer = Composer(pipe, reg)
    composer.set(["rex"])
    with pytest.raises(InvalidInput, match="cannot add the concept tokens"):
        composer.set(["rex", "plain"])
    assert_same(pipe, before)
    assert pipe.tokenizer is tokenizer and composer.active == {}


def test_concurrent_switches_are_serialised(
    reg: Registry, pipe: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A slow switch started first and a fast one started while it runs: with the lock the
    fast one waits and wins whole; without it, it would finish first and the slow one would
    overwrite only the targets it had not reached, leaving a mix of both subsets."""
    import threading
    import time

    from blockctl import compose as module

    pauses = {"slow": 0.004}

    def paced(plan: Any) -> Any:
        delta_of = plan_deltas(plan)
        pause = pauses.get(threading.current_thread().name, 0.0)
        return lambda key: (time.sleep(pause), delta_of(key))[1]

    composer = Composer(pipe, reg)
    composer.load(["rex"])  # so the slow thread's time goes to the switch itself
    composer.set(["tabby", "vangogh"])
    want = target_weights(pipe, reg)
    composer.restore()
    monkeypatch.setattr(module, "plan_deltas", paced)
    slow = threading.Thread(name="slow", target=composer.set, args=(["rex"],))
    fast = threading.Thread(name="fast", target=composer.set, args=(["tabby", "vangogh"],))
    slow.start()
    time.sleep(0.01)
    fast.start()
    slow.join()
    fast.join()
    assert composer.active == {"tabby": 1.0, "vangogh": 1.0}
    final = target_weights(pipe, reg)
    assert all(torch.equal(final[k], want[k]) for k in want)


def test_concepts_can_be_loaded_from_another_thread(reg: Registry, pipe: Any) -> None:
    """The embedded registry's SQLite connection belongs to the thread that opened it."""
    from concurrent.futures import ThreadPoolExecutor

    composer = Composer(pipe, reg)
    with ThreadPoolExecutor(max_workers=1) as pool:
        pool.submit(composer.set, ["rex", "vangogh"]).result()
    assert composer.active == {"rex": 1.0, "vangogh": 1.0}
    composer.restore()


def test_use_takes_a_plan_of_the_same_layout(
    reg: Registry, pipe: Any, tiny_base: Path, tmp_path: Path
) -> None:
    composer = Composer(pipe, reg)
    composer.use(plan_merge(reg, ["tabby"], {"tabby": 2.0}))
    assert composer.active == {"tabby": 2.0}
    other = make_published(tmp_path / "o", tiny_base, ("rex",), text_encoder=False)
    with pytest.raises(InvalidInput, match="another registry layout"):
        composer.use(plan_merge(other, ["rex"], {}))
    composer.restore()


# -- branch mode --------------------------------------------------------------------------------


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
    torch.testing.assert_close(got, want, rtol=TOL, atol=TOL)
    assert not torch.allclose(predict(pipe), want, rtol=TOL, atol=TOL)  # the concepts do change it


def test_branch_whole_pipeline_call_matches_fuse_mode(reg: Registry, pipe: Any) -> None:
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
    torch.testing.assert_close(got, want, rtol=TOL, atol=TOL)


def test_branch_switching_between_subsets(reg: Registry, pipe: Any) -> None:
    expected = {
        ("rex",): fused(pipe, reg, ["rex"], {}),
        ("tabby", "vangogh"): fused(pipe, reg, ["tabby", "vangogh"], {"tabby": 2.0}),
    }
    composer = Composer(pipe, reg, mode="branch")
    composer.load(["rex", "tabby", "vangogh"])
    composer.set(["rex"])
    first = predict(pipe)
    torch.testing.assert_close(first, expected[("rex",)], rtol=TOL, atol=TOL)
    composer.set(["tabby", "vangogh"], {"tabby": 2.0})
    assert composer.active == {"tabby": 2.0, "vangogh": 1.0}
    torch.testing.assert_close(predict(pipe), expected[("tabby", "vangogh")], rtol=TOL, atol=TOL)
    ids = pipe.tokenizer.convert_tokens_to_ids(["<tabby>", "<vangogh>"])
    assert ids == [len(pipe.tokenizer) - 2, len(pipe.tokenizer) - 1]  # as a merged folder has them
    composer.set(["rex"])
    assert torch.equal(predict(pipe), first)  # the same bank and mask: the same arithmetic
    composer.set([])
    assert composer.active == {}
    assert not any(isinstance(m, BranchLinear) for m in modules_of(pipe).values())


def test_branch_loading_more_concepts_leaves_the_active_ones(reg: Registry, pipe: Any) -> None:
    want = fused(pipe, reg, ["vangogh"], {"vangogh": 0.5})
    composer = Composer(pipe, reg, mode="branch")
    composer.set(["vangogh"], {"vangogh": 0.5})
    composer.load(["rex", "tabby"])  # new columns in every branch, masked off
    torch.testing.assert_close(predict(pipe), want, rtol=TOL, atol=TOL)
    assert composer.active == {"vangogh": 0.5}
    composer.restore()


def test_branch_restore_gives_back_the_base_graph_and_weights(reg: Registry, pipe: Any) -> None:
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
def test_branch_in_half_precision(reg: Registry, pipe: Any, dtype: torch.dtype, tol: float) -> None:
    pipe.to(dtype=dtype)
    want = fused(pipe, reg, ["rex", "tabby"], {"rex": 0.8})
    with compose(pipe, reg, ["rex", "tabby"], {"rex": 0.8}, mode="branch"):
        branch = next(m for m in modules_of(pipe).values() if isinstance(m, BranchLinear))
        bank = branch.bank
        assert bank.mask.dtype == dtype
        assert all(t.dtype == dtype for t in [*bank.downs.values(), *bank.ups.values()])
        got = predict(pipe)
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)


def test_branch_input_cache_never_serves_stale_results(reg: Registry, pipe: Any) -> None:
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


def test_branch_refuses_an_attn_layout(tiny_base: Path, tmp_path: Path, pipe: Any) -> None:
    attn = make_published(tmp_path / "attn", tiny_base, ("rex",), preset="attn")
    with pytest.raises(InvalidInput, match=r"read only text.*attn1"):
        Composer(pipe, attn, mode="branch")
    with pytest.raises(InvalidInput, match="unknown compose mode 'lazy'"):
        Composer(pipe, attn, mode="lazy")
    with compose(pipe, attn, ["rex"]):  # fuse mode takes it
        pass


def test_branch_two_composers_on_one_pipeline_are_refused(reg: Registry, pipe: Any) -> None:
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
