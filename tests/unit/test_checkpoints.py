"""rl.tracking.CheckpointManager: rotation keeps exactly ``keep_last`` checkpoints, and a checkpoint that was never
committed (its temporary directory, whatever it holds) is never listed or resumed from."""

import json

import pytest

from rl.tracking import CheckpointManager


def _write(mgr: CheckpointManager, step: int):
    tmp = mgr.begin(step)
    (tmp / "model").mkdir()
    (tmp / "model" / "weights.bin").write_bytes(b"w" * 16)
    return mgr.commit(tmp, step, {"step": step})


def _names(mgr: CheckpointManager) -> list[str]:
    return sorted(p.name for p in mgr.root.iterdir())


@pytest.mark.parametrize("keep_last", [1, 2, 3])
def test_rotation_keeps_exactly_keep_last_checkpoints(tmp_path, keep_last):
    mgr = CheckpointManager(tmp_path, keep_last)
    for step in range(1, 6):
        _write(mgr, step)
        kept = list(range(max(1, step - keep_last + 1), step + 1))
        # on disk, not only in list(): nothing else is left behind
        assert _names(mgr) == [f"step_{s:06d}" for s in kept], step
    assert [json.loads((p / "driver_state.json").read_text())["step"] for p in mgr.list()] == [6 - keep_last + i
                                                                                                for i in range(keep_last)]


def test_a_half_written_temporary_checkpoint_is_not_a_checkpoint(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=5)
    _write(mgr, 1)
    _write(mgr, 2)
    # A crash after the driver state was written into the temporary directory, before the rename: everything a
    # complete checkpoint holds is there, under the temporary name.
    tmp = mgr.begin(3)
    (tmp / "model").mkdir()
    (tmp / "driver_state.json").write_text(json.dumps({"step": 3}))
    assert mgr.latest() == mgr.root / "step_000002"
    assert [p.name for p in mgr.list()] == ["step_000001", "step_000002"]
    # A fresh manager (a resumed run) sees the same, and rotation never counts or deletes the temporary directory.
    again = CheckpointManager(tmp_path, keep_last=2)
    assert again.latest() == mgr.root / "step_000002"
    _write(again, 4)
    assert _names(again) == [".tmp_step_000003", "step_000002", "step_000004"]
    # Writing step 3 again replaces the stale temporary directory: nothing of the crashed attempt survives.
    (tmp / "stale.bin").write_bytes(b"x")
    path = _write(again, 3)
    assert not (path / "stale.bin").exists() and not tmp.exists()


def test_a_checkpoint_directory_without_driver_state_is_not_a_checkpoint(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=3)
    _write(mgr, 1)
    (mgr.root / "step_000002" / "model").mkdir(parents=True)  # copied in by hand, incomplete
    assert mgr.latest() == mgr.root / "step_000001"
    assert [p.name for p in mgr.list()] == ["step_000001"]
