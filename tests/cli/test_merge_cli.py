"""``blockctl merge`` and ``blockctl verify --merged`` from the command line: outputs, JSON,
every bad input's exit code, and interrupted merges leaving nothing behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from blockctl.merge.writers import PAUSE_ENV
from registry import Registry
from tests.support.cli import blockctl_command, cli
from tests.support.registries import make_published


@pytest.fixture(scope="module")
def reg(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Registry:
    return make_published(tmp_path_factory.mktemp("merge-cli"), tiny_base)


def test_merge_json_and_verify_merged(reg: Registry, tmp_path: Path) -> None:
    out = tmp_path / "merged"
    code, stdout, stderr = cli(
        reg, "merge", "rex", "tabby", "-o", str(out), "--scale", "rex=0.8", "--json"
    )
    assert code == 0, stdout + stderr
    doc = json.loads(stdout)
    assert doc["slots"] == [0, 1] and doc["bytes"] > 0 and doc["seconds"] >= 0
    assert [c["concept"] for c in doc["concepts"]] == ["rex", "tabby"]
    assert doc["concepts"][0]["scale"] == 0.8 and len(doc["concepts"][0]["sha256"]) == 64
    code, stdout, stderr = cli(reg, "verify", "--merged", str(out), "--json")
    assert code == 0, stdout + stderr
    report = json.loads(stdout)
    assert report["ok"] and report["concepts"] == ["rex", "tabby"]
    code, stdout, stderr = cli(reg, "verify", "--merged", str(out), "--tolerance", "0")
    assert code == 4, stdout + stderr


@pytest.mark.parametrize(
    ("fmt", "extra"), [("single-file", []), ("lora", []), ("lora", ["--lora-keys", "kohya"])]
)
def test_file_formats(reg: Registry, tmp_path: Path, fmt: str, extra: list[str]) -> None:
    out = tmp_path / "out.safetensors"
    code, stdout, stderr = cli(
        reg, "merge", "rex", "vangogh", "-o", str(out), "--format", fmt, *extra
    )
    assert code == 0, stdout + stderr
    assert "out.embeddings/ (rex, vangogh)" in stdout + stderr
    assert sorted(p.name for p in (tmp_path / "out.embeddings").glob("*.safetensors")) == [
        "rex.safetensors",
        "vangogh.safetensors",
    ]
    code, stdout, stderr = cli(reg, "verify", "--merged", str(out))
    assert code == 0, stdout + stderr


@pytest.mark.parametrize(
    ("args", "code", "needle"),
    [
        (["nobody"], 3, "published: rex, tabby, vangogh"),
        (["rex", "rex"], 2, "more than once"),
        ([], 2, "at least one concept"),
        (["rex", "--scale", "tabby=0.5"], 2, "not being merged"),
        (["rex", "--scale", "rex=strong"], 2, "not a number"),
        (["rex", "--scale", "rex"], 2, "NAME=FLOAT"),
        (["rex", "--dtype", "int4"], 2, "unknown dtype"),
        (["rex", "--format", "ckpt"], 2, "'ckpt' is not one of"),
        (["rex", "--format", "lora", "--lora-keys", "a1111"], 2, "'a1111' is not one of"),
    ],
)
def test_bad_input(reg: Registry, tmp_path: Path, args: list[str], code: int, needle: str) -> None:
    out = tmp_path / "o"
    got, stdout, stderr = cli(reg, "merge", *args, "-o", str(out))
    assert got == code, stdout + stderr
    assert needle in " ".join((stdout + stderr).split())
    assert list(tmp_path.iterdir()) == []


def test_existing_out_needs_force(reg: Registry, tmp_path: Path) -> None:
    out = tmp_path / "m"
    assert cli(reg, "merge", "rex", "-o", str(out))[0] == 0
    code, stdout, stderr = cli(reg, "merge", "tabby", "-o", str(out))
    assert code == 2 and "already exists" in (stdout + stderr)
    assert json.loads((out / "blockctl_merge.json").read_text())["concepts"][0]["concept"] == "rex"
    assert cli(reg, "merge", "tabby", "-o", str(out), "--force")[0] == 0
    assert (
        json.loads((out / "blockctl_merge.json").read_text())["concepts"][0]["concept"] == "tabby"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_unwritable_out(reg: Registry, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    code, stdout, stderr = cli(reg, "merge", "rex", "-o", str(tmp_path / "file" / "m"))
    assert code == 2 and "not a folder" in (stdout + stderr)
    code, stdout, stderr = cli(reg, "merge", "rex", "-o", str(tmp_path / "missing" / "m"))
    assert code == 2 and "does not exist" in (stdout + stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_tampered_adapter_exit_4(tiny_base: Path, tmp_path: Path) -> None:
    reg = make_published(tmp_path / "r", tiny_base, ("rex",), text_encoder=False)
    path = reg.adapter_file("rex")
    path.write_bytes(path.read_bytes()[:-1] + b"\0")
    code, stdout, stderr = cli(reg, "merge", "rex", "-o", str(tmp_path / "o"))
    assert code == 4 and "sha256" in (stdout + stderr)
    assert not (tmp_path / "o").exists()


def _start_paused_merge(reg: Registry, out: Path) -> subprocess.Popen[bytes]:
    env = dict(os.environ, **{PAUSE_ENV: "60"})
    cmd = blockctl_command("--registry", reg.location, "merge", "rex", "tabby", "-o", out)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    # Wait until the first weights file is in the temporary sibling: the writer then sleeps.
    while time.monotonic() < deadline:
        temps = list(out.parent.glob(f".{out.name}.tmp-*"))
        if temps and list(temps[0].rglob("*.safetensors")):
            return proc
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.1)
    proc.kill()
    raise AssertionError("merge never reached the middle of writing")


def test_sigkill_mid_write_leaves_no_out_and_rerun_cleans(reg: Registry, tmp_path: Path) -> None:
    out = tmp_path / "merged"
    proc = _start_paused_merge(reg, out)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    assert not out.exists()
    # A killed process cannot clean up; the next merge to the same OUT does.
    code, stdout, stderr = cli(reg, "merge", "rex", "-o", str(out))
    assert code == 0, stdout + stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


def test_sigterm_mid_write_cleans_up_at_once(reg: Registry, tmp_path: Path) -> None:
    out = tmp_path / "merged"
    proc = _start_paused_merge(reg, out)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) != 0
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("style", "extra"),
    [
        ("peft", "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"),
        ("kohya", "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"),
    ],
)
def test_verify_merged_lora_with_a_module_outside_the_layout(
    reg: Registry, tmp_path: Path, style: str, extra: str
) -> None:
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    out = tmp_path / "l.safetensors"
    assert cli(reg, "merge", "rex", "-o", str(out), "-f", "lora", "--lora-keys", style)[0] == 0
    tensors = load_file(str(out))
    with safe_open(str(out), framework="pt") as handle:
        metadata = handle.metadata()
    a, b = ("lora_A", "lora_B") if style == "peft" else ("lora_down", "lora_up")
    down = next(v for k, v in tensors.items() if k.endswith(f".{a}.weight"))
    tensors[f"{extra}.{a}.weight"] = torch.zeros(down.shape[0], 32, dtype=down.dtype)
    tensors[f"{extra}.{b}.weight"] = torch.zeros(32, down.shape[0], dtype=down.dtype)
    save_file(tensors, str(out), metadata=metadata)
    code, stdout, stderr = cli(reg, "verify", "--merged", str(out))
    assert code == 4, stdout + stderr
    assert "attn1.to_q" in (stdout + stderr) and "not a target" in (stdout + stderr)


def test_verify_merged_refuses_a_file_that_is_not_safetensors(
    reg: Registry, tmp_path: Path
) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    code, stdout, stderr = cli(reg, "verify", "--merged", str(tmp_path / "notes.txt"))
    assert code == 4 and "not a safetensors file" in (stdout + stderr), stdout + stderr


@pytest.mark.parametrize("fmt", ["diffusers", "single-file"])
def test_force_replaces_only_a_merge_output(reg: Registry, tmp_path: Path, fmt: str) -> None:
    """--force replaces an earlier merge, never a folder or file blockctl did not write."""
    out = tmp_path / ("mine" if fmt == "diffusers" else "mine.safetensors")
    if fmt == "diffusers":
        out.mkdir()
        (out / "notes.txt").write_text("the user's own")
    else:
        out.write_text("the user's own")
    before = sorted(p.name for p in tmp_path.rglob("*"))
    code, stdout, stderr = cli(reg, "merge", "rex", "-o", str(out), "-f", fmt, "--force")
    assert code == 2, stdout + stderr
    assert "not a blockctl merge output" in (stdout + stderr)
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_embeddings_folder_replaced_only_as_a_merge_output(reg: Registry, tmp_path: Path) -> None:
    out, folder = tmp_path / "m.safetensors", tmp_path / "m.embeddings"
    folder.mkdir()
    (folder / "mine.safetensors").write_text("the user's own")
    for extra in ([], ["--force"]):
        code, stdout, stderr = cli(reg, "merge", "rex", "-o", str(out), "-f", "lora", *extra)
        assert code == 2, stdout + stderr
        assert ("not a blockctl merge output" if extra else "already exists") in stdout + stderr
    assert not out.exists() and [p.name for p in folder.iterdir()] == ["mine.safetensors"]
    (folder / "mine.safetensors").unlink()
    folder.rmdir()
    assert cli(reg, "merge", "rex", "-o", str(out), "-f", "lora")[0] == 0
    code, stdout, stderr = cli(reg, "merge", "tabby", "-o", str(out), "-f", "lora", "--force")
    assert code == 0, stdout + stderr
    assert sorted(p.name for p in folder.glob("*.safetensors")) == ["tabby.safetensors"]
    code, stdout, stderr = cli(reg, "verify", "--merged", str(folder))
    assert code == 2 and "verify the merged file beside it" in stdout + stderr
