"""``blockctl.compose``: exact restore, switching between subsets, equality with the merge,
dtypes, refusal of foreign adapters and pipelines, and the lock."""

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
from registry import Registry
from tests.conftest import create_registry, write_random_adapter
from tests.support.registries import make_published

TOKEN_EMBEDDING = "embeddings.token_embedding.weight"


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


def test_a_foreign_adapter_is_refused(tiny_base: Path, tmp_path: Path, pipe: Any) -> None:
    home = make_published(tmp_path / "home", tiny_base, ("rex",), text_encoder=False)
    other = create_registry(tmp_path / "other", tiny_base, slots=2, rank=4)
    other.reserve("spy", "<spy>", "thing", "tester")
    foreign = write_random_adapter(other, "spy", tmp_path / "spy.safetensors")
    home.reserve("spy", "<spy>", "thing", "tester")
    home.publish("spy", foreign, sha256_file(foreign))  # stored without the CLI's checks
    before = snapshot(pipe)
    composer = Composer(pipe, home)
    composer.set(["rex"])
    with pytest.raises(ValidationFailed, match="adapter of 'spy'"):
        composer.set(["rex", "spy"])
    assert composer.active == {"rex": 1.0}  # the refused switch changed nothing
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
