"""Checkpoint validation and the fall-back to the newest complete checkpoint, on checkpoint folders
laid out as `save_and_report` writes them (state, per-rank manifests, shards), locally and on S3.
The same fall-back inside a real training run is drilled in tests/cluster/test_local_cluster.py."""

from __future__ import annotations

import json
import logging
import os
import shutil

import pytest

from llmos_ray.errors import CheckpointError
from llmos_ray.train import checkpoint as ckpt_io


def write_checkpoint(root: str, step: int, world: int = 2) -> str:
    """A checkpoint folder as two ranks leave it: each rank's shard, RNG file and manifest."""
    path = os.path.join(root, ckpt_io.checkpoint_name(step))
    for rank in range(world):
        local = os.path.join(root, f".rank{rank}-{step}")
        os.makedirs(os.path.join(local, "ds", "state"))
        with open(os.path.join(local, "ds", "state", f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"), "wb") as f:
            f.write(os.urandom(1000 + rank))
        if rank == 0:
            with open(os.path.join(local, ckpt_io.STATE_FILE), "w") as f:
                json.dump({"step": step, "world_size": world, "zero_stage": 2, "tokens_seen": 0,
                           "data": {"epoch": 0, "micro_batches": step}}, f)
        ckpt_io._write_manifest(local, rank)
        shutil.copytree(local, path, dirs_exist_ok=True)  # Ray Train merges the ranks' folders
        shutil.rmtree(local)
    return path


def truncate(path: str) -> None:
    with open(path, "r+b") as f:
        f.truncate(10)


def test_complete_checkpoint_validates(tmp_path):
    path = write_checkpoint(str(tmp_path), 4)
    assert ckpt_io.validate(path)["step"] == 4
    assert sorted(os.listdir(os.path.join(path, "manifest"))) == ["rank0.json", "rank1.json"]


@pytest.mark.parametrize("damage", ["truncate_shard", "delete_shard", "delete_manifest"])
def test_damaged_checkpoint_is_named_and_refused(tmp_path, damage):
    path = write_checkpoint(str(tmp_path), 4)
    shard = os.path.join(path, "ds", "state", "zero_pp_rank_1_mp_rank_00_optim_states.pt")
    if damage == "truncate_shard":
        truncate(shard)
        match = "zero_pp_rank_1_mp_rank_00_optim_states.pt \\(10 bytes, written as 1001\\)"
    elif damage == "delete_shard":
        os.remove(shard)
        match = "zero_pp_rank_1_mp_rank_00_optim_states.pt \\(missing\\)"
    else:
        os.remove(os.path.join(path, "manifest", "rank1.json"))
        match = "rank 1 never finished writing"
    with pytest.raises(CheckpointError, match=match):
        ckpt_io.validate(path)


def test_resume_falls_back_past_damaged_checkpoints_with_a_warning(tmp_path, caplog):
    good = write_checkpoint(str(tmp_path), 4)
    bad8 = write_checkpoint(str(tmp_path), 8)
    bad12 = write_checkpoint(str(tmp_path), 12)
    write_checkpoint(str(tmp_path), 16)  # newer than the one resumed from: never considered
    truncate(os.path.join(bad12, "ds", "state", "zero_pp_rank_0_mp_rank_00_optim_states.pt"))
    os.remove(os.path.join(bad8, "manifest", "rank0.json"))
    with caplog.at_level(logging.WARNING, logger="llmos_ray.train.checkpoint"):
        chosen, state, skipped = ckpt_io.usable_checkpoint(bad12)
    assert chosen.path == good and state["step"] == 4
    assert skipped == ["checkpoint_00000012", "checkpoint_00000008"]
    assert "resuming from checkpoint_00000004" in caplog.text and "damaged" in caplog.text


def test_complete_checkpoint_is_used_as_is(tmp_path):
    write_checkpoint(str(tmp_path), 4)
    latest = write_checkpoint(str(tmp_path), 8)
    chosen, state, skipped = ckpt_io.usable_checkpoint(latest)
    assert chosen.path == latest and state["step"] == 8 and skipped == []


def test_no_complete_checkpoint_left_says_how_to_start_over(tmp_path):
    only = write_checkpoint(str(tmp_path), 4)
    truncate(os.path.join(only, "ds", "state", "zero_pp_rank_0_mp_rank_00_optim_states.pt"))
    with pytest.raises(CheckpointError, match="no complete checkpoint precedes it.*run.resume=never"):
        ckpt_io.usable_checkpoint(only)


def test_fall_back_on_s3(s3_bucket, tmp_path):
    import s3fs

    fs = s3fs.S3FileSystem()
    for step in (4, 8):
        fs.put(write_checkpoint(str(tmp_path), step), f"{s3_bucket}/run/{ckpt_io.checkpoint_name(step)}",
               recursive=True)
    fs.rm(f"{s3_bucket}/run/checkpoint_00000008/ds/state/zero_pp_rank_1_mp_rank_00_optim_states.pt")
    chosen, state, skipped = ckpt_io.usable_checkpoint(f"{s3_bucket}/run/checkpoint_00000008")
    assert state["step"] == 4 and chosen.path.endswith("run/checkpoint_00000004")
    assert skipped == ["checkpoint_00000008"]
