"""checkpoint/sharded.py in one process: the sharded store's layout, seal, fallback, snapshot and refusals.

One process without a process group writes what one process of a sharded run writes: DCP
takes the plain model's tensors as that process's shards. The model's state is told it is
sharded (ModelState.sharded), so the Checkpointer picks the sharded store as it does for
DTensor parameters; tests/test_sharded_training.py runs the same store on 2 and 4 processes
with models sharded by fully_shard, through the trainer.
"""

import os
import pickle
import shutil
import threading

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn
from torch.distributed.checkpoint import HuggingFaceStorageWriter
from torch.optim.lr_scheduler import LambdaLR

from accelerated_trainer.checkpoint import WEIGHTS, Checkpointer, ModelState, files, load_weights_dir, sharded
from accelerated_trainer.checkpoint.store import FullStore
from accelerated_trainer.config import CheckpointOptions
from accelerated_trainer.export import export_model
from checkpoint_helpers import TrainingPosition, accelerator  # noqa: F401  (fixture)
from checkpoint_helpers import trained as _trained

SHARD = "shard-00001-model-00001-of-00001.safetensors"
# One process without a process group is what these tests mean; DCP warns that it assumes so.
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")








def trained(seed=0, steps=3, width=8):
    """A schedule that halves the LR each step: a restored LR shows in param_groups."""
    return _trained(seed, steps, width, decay=0.5)


def sharded_checkpointer(run_dir, accelerator, model, optimizer, scheduler, sharded_model=True):
    options = CheckpointOptions(monitor="val_loss", mode="min", save_top_k=1, save_every_n_steps=None, resume=False,
                                overwrite=False, async_save=False, on_save_error="stop")
    model_state = ModelState(accelerator, model)
    model_state.sharded = sharded_model  # the store of DTensor parameters, over this process's tensors
    states = {"model": model_state, "optimizer": optimizer, "scheduler": scheduler, "trainer": TrainingPosition()}
    return Checkpointer(run_dir, accelerator, options, states)


def save_last(checkpointer, step, asynchronous=False):
    checkpointer.states["trainer"].state = {"step": step, "epoch": step // 10}
    checkpointer.save_last(step // 10, step, asynchronous=asynchronous)


def weights_of(model):
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def optimizer_tensors(optimizer):
    return {f"{i}.{k}": v.clone() for i, state in optimizer.state_dict()["state"].items() for k, v in state.items()}


def assert_equal(actual: dict, expected: dict):
    assert actual.keys() == expected.keys()
    for name in expected:
        assert torch.equal(actual[name], expected[name]), name


def forbid_unpickling(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("unpickled")

    for module, name in [(pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load"), (torch.serialization, "load")]:
        monkeypatch.setattr(module, name, refuse)


def test_the_checkpointer_picks_the_sharded_store_for_a_sharded_model(tmp_path, accelerator):
    model, optimizer, scheduler = trained()
    assert isinstance(sharded_checkpointer(tmp_path, accelerator, model, optimizer, scheduler).store, sharded.ShardedStore)
    plain = sharded_checkpointer(tmp_path, accelerator, model, optimizer, scheduler, sharded_model=False)
    assert isinstance(plain.store, FullStore) and not ModelState(accelerator, model).sharded


def test_a_sharded_last_is_safetensors_and_json_sealed_by_one_manifest(tmp_path, accelerator):
    run_dir = tmp_path / "run"
    checkpointer = sharded_checkpointer(run_dir, accelerator, *trained())
    save_last(checkpointer, 10)
    last = run_dir / "last"
    names = sorted(path.name for path in last.iterdir())
    assert names == sorted([SHARD, "manifest.json", "optimizer.json", "rng-rank0.json", "sharded.json", "state.json"])
    assert files.verify(last) is None
    assert sorted(files.read_json(last / "manifest.json")["files"]) == sorted(set(names) - {"manifest.json"})
    assert files.read_json(last / "sharded.json") == {"format": "dcp-safetensors", "world_size": 1, "shards": [SHARD]}
    with safe_open(str(last / SHARD), framework="pt") as handle:
        keys = set(handle.keys())
    assert {"model.0.weight", "model.2.bias", "optimizer.state.0.weight.exp_avg", "optimizer.state.0.weight.step"} <= keys
    assert files.read_json(last / "optimizer.json")["param_groups.0.weight.betas"] == {"__tuple__": [0.9, 0.999]}
    # The manifest's CRC32 of the shard, summed while DCP wrote it, is the file's.
    assert files.verify(last) is None and files._crc32(last / SHARD) == files.read_json(last / "manifest.json")["files"][SHARD]["crc32"]


def test_resume_restores_model_optimizer_and_scheduler_without_unpickling(tmp_path, accelerator, monkeypatch):
    run_dir = tmp_path / "run"
    model, optimizer, scheduler = trained(steps=3)
    save_last(sharded_checkpointer(run_dir, accelerator, model, optimizer, scheduler), 30)
    fresh, fresh_optimizer, fresh_scheduler = trained(seed=1, steps=0)
    forbid_unpickling(monkeypatch)
    saved = sharded_checkpointer(run_dir, accelerator, fresh, fresh_optimizer, fresh_scheduler).load(run_dir / "last")
    monkeypatch.undo()
    assert saved["step"] == 30
    assert_equal(weights_of(fresh), weights_of(model))
    assert_equal(optimizer_tensors(fresh_optimizer), optimizer_tensors(optimizer))
    assert fresh_optimizer.state_dict()["param_groups"] == optimizer.state_dict()["param_groups"]  # lr 0.01 * 0.5**3, betas a tuple
    assert fresh_scheduler.state_dict() == scheduler.state_dict()


def test_a_checkpoint_of_either_kind_loads_into_a_model_of_either_kind(tmp_path, accelerator):
    """Each checkpoint is read by its own store: a one-process run resumes a sharded run's `last` and back."""
    model, optimizer, scheduler = trained()
    save_last(sharded_checkpointer(tmp_path / "sharded", accelerator, model, optimizer, scheduler), 10)
    save_last(sharded_checkpointer(tmp_path / "full", accelerator, model, optimizer, scheduler, sharded_model=False), 10)
    assert (tmp_path / "full" / "last" / WEIGHTS).is_file()
    for source, into_sharded in [("sharded", False), ("full", True)]:
        fresh, fresh_optimizer, fresh_scheduler = trained(seed=1, steps=0)
        checkpointer = sharded_checkpointer(tmp_path / "into", accelerator, fresh, fresh_optimizer, fresh_scheduler, into_sharded)
        checkpointer.load(tmp_path / source / "last")
        assert_equal(weights_of(fresh), weights_of(model))
        assert_equal(optimizer_tensors(fresh_optimizer), optimizer_tensors(optimizer))


def test_slots_shift_as_for_full_checkpoints_and_a_recycled_slot_keeps_no_file(tmp_path, accelerator):
    run_dir = tmp_path / "run"
    model, optimizer, scheduler = trained()
    checkpointer = sharded_checkpointer(run_dir, accelerator, model, optimizer, scheduler)
    for step in (10, 20, 30):
        save_last(checkpointer, step)
    # As if `older` had been written by 2 processes: a shard this run does not write. Kept in the
    # recycled slot, it would be read as part of the new checkpoint.
    shutil.copy(run_dir / "older" / SHARD, run_dir / "older" / "shard-00002-model-00001-of-00001.safetensors")
    save_last(checkpointer, 40)  # written into `older`'s directory
    assert [files.read_json(run_dir / name / "state.json")["step"] for name in ("last", "previous", "older")] == [40, 30, 20]
    assert all(files.verify(run_dir / name) is None for name in ("last", "previous", "older"))
    assert sorted(path.name for path in (run_dir / "last").glob("*.safetensors")) == [SHARD]
    fresh, fresh_optimizer, fresh_scheduler = trained(seed=1, steps=0)
    sharded_checkpointer(tmp_path / "into", accelerator, fresh, fresh_optimizer, fresh_scheduler).load(run_dir / "last")
    assert_equal(weights_of(fresh), weights_of(model))


def test_a_corrupted_shard_is_detected_and_resume_falls_back_to_previous(tmp_path, accelerator):
    run_dir = tmp_path / "run"
    checkpointer = sharded_checkpointer(run_dir, accelerator, *trained())
    save_last(checkpointer, 10)
    save_last(checkpointer, 20)
    shard = run_dir / "last" / SHARD
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0x01  # one bit of a tensor's bytes: the file still parses, only the checksum tells
    shard.write_bytes(bytes(data))
    found, skipped = checkpointer.find_resumable()
    assert found == run_dir / "previous"
    assert len(skipped) == 1 and SHARD in skipped[0] and "corrupted" in skipped[0]


def test_unlisted_or_missing_shards_are_refused(tmp_path, accelerator):
    run_dir = tmp_path / "run"
    model, optimizer, scheduler = trained()
    checkpointer = sharded_checkpointer(run_dir, accelerator, model, optimizer, scheduler)
    save_last(checkpointer, 10)
    last = run_dir / "last"
    # A safetensors file sharded.json does not list: DCP's reader would merge it into the checkpoint.
    shutil.copy(last / SHARD, last / "extra.safetensors")
    assert files.verify(last) == f"{last / 'extra.safetensors'} is not in manifest.json (a file added after the checkpoint was sealed)"
    with pytest.raises(files.CheckpointError, match=r"does not list \(\['extra\.safetensors'\]\)"):
        checkpointer.load(last)
    (last / "extra.safetensors").unlink()
    (last / SHARD).rename(last / "moved")
    with pytest.raises(files.CheckpointError, match=r"lacks listed ones \(\['shard-00001"):
        checkpointer.load(last)


def test_a_checkpoint_that_does_not_fit_the_model_is_refused(tmp_path, accelerator):
    run_dir = tmp_path / "run"
    save_last(sharded_checkpointer(run_dir, accelerator, *trained(width=8)), 10)
    wider = sharded_checkpointer(tmp_path / "other", accelerator, *trained(width=9))
    with pytest.raises(files.CheckpointError, match=r"model\.0\.weight has shape \(8, 4\) there, \(9, 4\) here"):
        wider.load(run_dir / "last")
    torch.manual_seed(0)
    deeper = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2), nn.Linear(2, 2))
    optimizer = torch.optim.AdamW(deeper.parameters())
    with pytest.raises(files.CheckpointError, match=r"does not fit the model and optimizer: missing \['model\.3\.bias'"):
        sharded_checkpointer(tmp_path / "deeper", accelerator, deeper, optimizer, LambdaLR(optimizer, lambda s: 1.0)).load(run_dir / "last")


def test_a_save_before_the_first_step_is_refused_and_changes_nothing(tmp_path, accelerator):
    model = nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    before = weights_of(model)
    checkpointer = sharded_checkpointer(tmp_path / "run", accelerator, model, optimizer, LambdaLR(optimizer, lambda s: 1.0))
    with pytest.raises(files.CheckpointError, match="before the optimizer's first step"):
        save_last(checkpointer, 0)
    assert not optimizer.state and all(p.grad is None for p in model.parameters())
    assert_equal(weights_of(model), before)
    assert checkpointer.last is None and not (tmp_path / "run" / "last").exists()


def test_an_asynchronous_save_writes_the_state_as_it_was_when_asked(tmp_path, accelerator, monkeypatch):
    """DCP is held before it writes until training has changed the weights and optimizer state in place."""
    run_dir = tmp_path / "run"
    model, optimizer, scheduler = trained()
    checkpointer = sharded_checkpointer(run_dir, accelerator, model, optimizer, scheduler)
    saved_weights, saved_optimizer = weights_of(model), optimizer_tensors(optimizer)
    may_write = threading.Event()
    write_data = HuggingFaceStorageWriter.write_data
    monkeypatch.setattr(HuggingFaceStorageWriter, "write_data", lambda *args: (may_write.wait(timeout=30), write_data(*args))[1])

    save_last(checkpointer, 3, asynchronous=True)
    for _ in range(2):  # two more training steps, in place, as the trainer runs them
        model(torch.randn(6, 4)).pow(2).mean().backward()
        checkpointer.before_optimizer_step()  # returns once the shards are staged, before DCP writes
        optimizer.step()
        optimizer.zero_grad()
    assert not (run_dir / "last").exists(), "DCP is still held"
    may_write.set()
    checkpointer.wait()

    assert files.verify(run_dir / "last") is None
    fresh, fresh_optimizer, fresh_scheduler = trained(seed=1, steps=0)
    sharded_checkpointer(tmp_path / "into", accelerator, fresh, fresh_optimizer, fresh_scheduler).load(run_dir / "last")
    assert_equal(weights_of(fresh), saved_weights)
    assert_equal(optimizer_tensors(fresh_optimizer), saved_optimizer)


@pytest.mark.parametrize("asynchronous", [False, True])
def test_a_failed_shard_write_keeps_the_earlier_checkpoints(tmp_path, accelerator, monkeypatch, asynchronous):
    run_dir = tmp_path / "run"
    checkpointer = sharded_checkpointer(run_dir, accelerator, *trained())
    save_last(checkpointer, 10)
    save_last(checkpointer, 20)

    def disk_full(self, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(sharded._SummingStream, "write", disk_full)
    with pytest.raises(files.CheckpointError, match=r"last failed: process 0: .*No space left on device"):
        save_last(checkpointer, 30, asynchronous=asynchronous)
        checkpointer.wait()
    assert checkpointer.last.step == 20
    assert [files.read_json(run_dir / name / "state.json")["step"] for name in ("last", "previous")] == [20, 10]
    assert all(files.verify(run_dir / name) is None for name in ("last", "previous"))
    assert not (run_dir / ".last.tmp").exists()
    monkeypatch.undo()
    save_last(checkpointer, 40)  # the next save goes where the failed one went
    assert [files.read_json(run_dir / name / "state.json")["step"] for name in ("last", "previous", "older")] == [40, 20, 10]


def test_a_sealed_interrupted_save_is_completed_on_resume(tmp_path, accelerator):
    run_dir = tmp_path / "run"
    checkpointer = sharded_checkpointer(run_dir, accelerator, *trained())
    save_last(checkpointer, 10)
    save_last(checkpointer, 20)
    (run_dir / "last").rename(run_dir / ".last.tmp")  # a crash between the renames of the save of step 20
    (run_dir / "previous").rename(run_dir / "last")
    assert "step 20" in checkpointer.run_dir.recover_interrupted_save()
    assert files.read_json(run_dir / "last" / "state.json")["step"] == 20 and files.verify(run_dir / "last") is None


def test_the_weights_of_a_sharded_last_load_and_export_whole(tmp_path, accelerator):
    run_dir = tmp_path / "run"
    model, optimizer, scheduler = trained()
    save_last(sharded_checkpointer(run_dir, accelerator, model, optimizer, scheduler), 10)
    assert_equal(sharded.read_full_weights(run_dir / "last"), weights_of(model))
    fresh, _, _ = trained(seed=1, steps=0)
    load_weights_dir(run_dir / "last", ModelState(accelerator, fresh))
    assert_equal(weights_of(fresh), weights_of(model))
    files.write_json(run_dir / "config.json", {})  # what export copies as trainer_config.json
    out = export_model(run_dir, tmp_path / "export", checkpoint="last")
    assert sorted(path.name for path in out.iterdir()) == ["manifest.json", "meta.json", WEIGHTS, "trainer_config.json"]
    assert_equal(load_file(out / WEIGHTS), weights_of(model))
    assert files.read_json(out / "meta.json")["step"] == 10


def test_no_file_of_a_sharded_run_directory_is_a_pickle(tmp_path, accelerator):
    run_dir = tmp_path / "run"
    checkpointer = sharded_checkpointer(run_dir, accelerator, *trained())
    save_last(checkpointer, 10)
    checkpointer.maybe_save_top(0.5, epoch=1, step=10, metrics={"val_loss": 0.5})
    for path in run_dir.rglob("*"):
        if path.is_file() and path.name != ".lock.json":
            assert path.suffix in (".json", ".safetensors"), path
            head = path.read_bytes()[:2]
            assert head[:1] != b"\x80" and head != b"PK", f"{path} looks like a pickle or a torch.save zip"
    assert (run_dir / "best" / WEIGHTS).is_file()  # best/ and top/* stay one consolidated file
    assert os.listdir(run_dir / "top")
