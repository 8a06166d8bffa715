"""Atomic checkpoints: layout, latest pointer, crash leftovers, pruning, corruption."""

from __future__ import annotations

import json

import pytest
import torch

from deltanet.models import DeltaNetForCausalLM, get_config
from deltanet.training.checkpoint import (CheckpointError, capture_rng, find_checkpoint, list_checkpoints,
                                          load_model, load_training_state, restore_rng, save_checkpoint)
from deltanet.training.tokenizer import ByteTokenizer


@pytest.fixture
def model():
    return DeltaNetForCausalLM(get_config("tiny", vocab_size=320, hidden_size=32, num_hidden_layers=1,
                                          num_heads=2, intermediate_size=64))


def _save(run, step, model, keep=2):
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randint(0, 320, (1, 8)), labels=torch.randint(0, 320, (1, 8))).loss.backward()
    opt.step()
    return save_checkpoint(run, step, model=model, model_state=model.state_dict(), optimizer_state=opt.state_dict(),
                           trainer_state={"step": step}, rng_states=[capture_rng()], tokenizer=ByteTokenizer(),
                           keep=keep)


def test_save_load_roundtrip_and_pruning(tmp_path, model):
    for step in (1, 2, 3):
        _save(tmp_path, step, model)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000002", "step_00000003"]
    ckpt = find_checkpoint(tmp_path)
    assert ckpt.name == "step_00000003" and find_checkpoint(ckpt) == ckpt
    back = load_model(ckpt)
    for (k, a), b in zip(model.state_dict().items(), back.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)
    state = load_training_state(ckpt)
    assert state["trainer"]["step"] == 3 and state["optimizer"]["state"]


def test_leftover_temp_dir_is_ignored(tmp_path, model):
    """A crash mid-write leaves a .tmp dir and an old latest: loading still gets the old one."""
    _save(tmp_path, 5, model)
    (tmp_path / "checkpoints" / ".tmp-step_00000006").mkdir()
    (tmp_path / "checkpoints" / ".tmp-step_00000006" / "model.safetensors").write_bytes(b"partial")
    assert find_checkpoint(tmp_path).name == "step_00000005"
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000005"]
    _save(tmp_path, 6, model)  # the next save replaces the leftover
    assert find_checkpoint(tmp_path).name == "step_00000006"


def test_corrupt_checkpoint_errors(tmp_path, model):
    ckpt = _save(tmp_path, 1, model)
    (ckpt / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(CheckpointError, match="corrupt checkpoint"):
        load_model(ckpt)
    (ckpt / "optimizer.pt").write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match="corrupt checkpoint"):
        load_training_state(ckpt)
    (ckpt / "rng.pt").unlink()
    with pytest.raises(CheckpointError):
        load_training_state(ckpt)


def test_find_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        find_checkpoint(tmp_path / "missing")
    with pytest.raises(CheckpointError, match="no checkpoint in"):
        find_checkpoint(tmp_path)
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "latest").write_text("step_00000009\n")
    with pytest.raises(CheckpointError, match="missing checkpoint"):
        find_checkpoint(tmp_path)


def test_rng_roundtrip():
    state = capture_rng()
    a = torch.rand(3)
    restore_rng(state)
    assert torch.equal(torch.rand(3), a)
    json.dumps(state["python"])  # plain lists, loadable with weights_only


def test_missing_or_dangling_latest_falls_back_to_newest_step(tmp_path, model):
    """step_* folders only appear complete (renamed into place), so without ``latest`` the newest is the checkpoint."""
    for step in (2, 4):
        _save(tmp_path, step, model)
    (tmp_path / "checkpoints" / "latest").unlink()
    assert find_checkpoint(tmp_path).name == "step_00000004"
    assert find_checkpoint(tmp_path / "checkpoints").name == "step_00000004"
    (tmp_path / "checkpoints" / "latest").write_text("step_00000009\n")  # points at a deleted folder
    assert find_checkpoint(tmp_path).name == "step_00000004"


def test_checkpoint_files_get_the_default_file_mode(tmp_path, model):
    """model.safetensors used to be 0600 while every other file was 0644 (umask 022)."""
    import os

    old = os.umask(0o022)
    try:
        ckpt = _save(tmp_path, 1, model)
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in ckpt.iterdir() if p.is_file()}
    assert modes["model.safetensors"] == 0o644 and set(modes.values()) == {0o644}, modes


def test_failed_start_removes_only_what_it_added(tmp_path):
    from deltanet.training.checkpoint import removing_new_files_on_failure

    new = tmp_path / "runs" / "r1"  # runs/ does not exist yet: it goes too
    with pytest.raises(RuntimeError), removing_new_files_on_failure(new):
        (new / "config.json").write_text("{}")
        raise RuntimeError("bad data")
    assert not (tmp_path / "runs").exists()
    mine = tmp_path / "mine"  # a folder the user made, with their own file in it
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    with pytest.raises(RuntimeError), removing_new_files_on_failure(mine):
        (mine / "tokenizer_meta.json").write_text("{}")
        (mine / "checkpoints").mkdir()
        raise RuntimeError("bad data")
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    with removing_new_files_on_failure(new):  # success keeps everything
        (new / "config.json").write_text("{}")
    assert (new / "config.json").is_file()
