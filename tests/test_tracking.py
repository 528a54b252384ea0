"""Tracking: which trackers start, and what metrics.jsonl, TensorBoard and an offline W&B run hold."""

import json
import time
import struct
import zlib

import pytest
import wandb
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from wandb.proto import wandb_internal_pb2

from accelerated_trainer import AcceleratedTrainer, ConfigError
from accelerated_trainer.config import ExperimentOptions
from accelerated_trainer.tracking import Tracker, trackers_for

from conftest import digits_config

# ---------------------------------------------------------------- readers for what the trackers wrote


def read_wandb_records(path):
    """The protobuf Records of a `.wandb` transaction log.

    wandb 0.31 ships no Python reader (wandb-core writes the file). The format is LevelDB's log:
    a 7-byte file header (":W&B", magic 0xBEE1, version), then 32 KiB blocks of chunks, each
    crc32 (of type byte + data, little-endian) / length / type (full, first, middle, last),
    a chunk never crossing a block boundary (a tail under 7 bytes is padding).
    """
    data = path.read_bytes()
    ident, magic, _version = struct.unpack("<4sHB", data[:7])
    assert (ident, magic) == (b":W&B", 0xBEE1), f"{path} is not a W&B transaction log"
    block, pos, pending, records = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:  # zero padding at the end of a block
            pos += block - pos % block
            continue
        chunk = data[pos + 7:pos + 7 + length]
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) == crc, f"{path}: bad checksum at byte {pos}"
        pos += 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):  # a record is complete
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def wandb_history(records):
    """{step: {key: value}} from the history records (values are JSON in the log)."""
    history = {}
    for record in records:
        if record.WhichOneof("record_type") == "history":
            row = {item.key or ".".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            history.setdefault(record.history.step.num, {}).update(row)
    return history


def wandb_config(records):
    return {item.key or ".".join(item.nested_key): json.loads(item.value_json)
            for record in records if record.WhichOneof("record_type") == "config" for item in record.config.update}


def tensorboard_scalars(log_dir):
    """{tag: [(step, value), ...]} in the order TensorBoard shows them."""
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})  # 0: keep every value
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def metric_rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def logged(rows, key):
    """{step: value} of one key in metrics.jsonl rows."""
    return {row["step"]: row[key] for row in rows if key in row}


# ---------------------------------------------------------------- which trackers start


@pytest.mark.parametrize("trackers, wandb_mode, expected", [
    (["wandb"], "offline", ["wandb"]),
    (["wandb"], "disabled", []),
    (["wandb", "tensorboard"], "offline", ["wandb", "tensorboard"]),
    (["wandb", "tensorboard"], "disabled", ["tensorboard"]),
    (["tensorboard"], "online", ["tensorboard"]),
    ([], "online", []),
])
def test_trackers_for(trackers, wandb_mode, expected):
    options = ExperimentOptions(trackers=trackers, wandb={"mode": wandb_mode})
    assert trackers_for(options) == expected


def test_tensorboard_not_installed_is_a_config_error(tmp_path, monkeypatch):
    monkeypatch.setattr("accelerate.utils.is_tensorboard_available", lambda: False)
    config = digits_config(tmp_path, experiment_options={"trackers": ["tensorboard"]})
    with pytest.raises(ConfigError, match=r"experiment_options.trackers.*pip install tensorboard"):
        AcceleratedTrainer(None, config)


def make_tracker(run_dir, trackers, **wandb):
    AcceleratorState._reset_state(reset_partial_state=False)
    options = ExperimentOptions(title="t", trackers=trackers, wandb=wandb or {"mode": "disabled"})
    accelerator = Accelerator(log_with=trackers_for(options) or None, project_dir=str(run_dir))
    return Tracker(accelerator, options, run_dir, {"training_options": {"n_epochs": 2, "betas": [0.9, 0.99]}})


def test_without_trackers_only_metrics_jsonl_is_written(tmp_path):
    tracker = make_tracker(tmp_path, [])
    tracker.start()
    tracker.log({"train_loss": float("nan"), "lr": 0.1}, step=1)
    tracker.log({"val_loss": float("inf")}, step=2)
    tracker.finish({"steps": 2})
    assert metric_rows(tmp_path) == [{"step": 1, "train_loss": "nan", "lr": 0.1}, {"step": 2, "val_loss": "inf"}]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]


def test_tensorboard_resume_replaces_the_steps_after_the_checkpoint(tmp_path):
    # A run that logged steps 1-4, crashed, and resumed from its checkpoint at step 2.
    first = make_tracker(tmp_path, ["tensorboard"])
    first.start()
    for step in range(1, 5):
        first.log({"train_loss": float(step)}, step=step)
    first.finish({})
    resumed = make_tracker(tmp_path, ["tensorboard"])
    resumed.start(first.run_id, step=2)
    for step in (3, 4):
        resumed.log({"train_loss": 10.0 * step}, step=step)
    resumed.finish({})
    scalars = tensorboard_scalars(tmp_path / "tensorboard" / "accelerated-trainer")
    assert scalars["train_loss"] == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]
    assert resumed.run_id == first.run_id


def test_trackers_start_in_the_background_and_a_failed_start_is_reported_and_dropped(tmp_path, monkeypatch, capsys):
    tracker = make_tracker(tmp_path, ["tensorboard"])
    started, logged = [], []

    def init_trackers(project, init_kwargs=None):
        time.sleep(0.3)  # a slow wandb.init
        started.append(project)
        raise RuntimeError("tracker service refused the run")

    monkeypatch.setattr(tracker.accelerator, "init_trackers", init_trackers)
    monkeypatch.setattr(tracker.accelerator, "log", lambda values, step: logged.append(step))
    began = time.perf_counter()
    tracker.start()
    assert time.perf_counter() - began < 0.2 and started == [], "start() does not wait for the trackers"
    tracker.log({"train_loss": 1.0}, step=1)  # a tracker never stands between the run and its checkpoints
    tracker.log({"train_loss": 0.5}, step=2)
    assert started == ["accelerated-trainer"] and logged == [], "the failed tracker is dropped"
    out = capsys.readouterr().out
    assert out.count("tracker service refused the run") == 1 and "dropped" in out, "reported once"
    assert metric_rows(tmp_path) == [{"step": 1, "train_loss": 1.0}, {"step": 2, "train_loss": 0.5}]
    tracker.finish({})  # closes what there is


# ---------------------------------------------------------------- a real run with both trackers, then a resume


@pytest.fixture(scope="module")
def tracked_runs(tmp_path_factory):
    """A 2-epoch run with W&B (offline) and TensorBoard, then a resume of it to 3 epochs."""
    root = tmp_path_factory.mktemp("tracked")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("HOME", str(root))  # no netrc, no W&B settings of the machine
        env.setenv("WANDB_API_KEY", "")
        env.delenv("WANDB_MODE", raising=False)
        experiment = {"wandb": {"mode": "offline"}, "trackers": ["wandb", "tensorboard"]}
        first = AcceleratedTrainer(None, digits_config(root, experiment_options=experiment)).train()
        run_dir = first.run_dir
        first_rows = metric_rows(run_dir)
        first_run_id = json.loads((run_dir / "last" / "state.json").read_text())["run_id"]
        resumed = AcceleratedTrainer(None, digits_config(root, training_options={"n_epochs": 3},
                                                         experiment_options={**experiment, "resume": True})).train()
        # run.finish() can return before wandb-core has flushed the log to disk; teardown waits for it.
        wandb.teardown()
    return {"run_dir": run_dir, "first": first, "resumed": resumed, "first_rows": first_rows,
            "first_run_id": first_run_id, "rows": metric_rows(run_dir)}


def test_tensorboard_holds_every_logged_value(tracked_runs):
    rows = tracked_runs["rows"]
    scalars = tensorboard_scalars(tracked_runs["run_dir"] / "tensorboard" / "accelerated-trainer")
    for key in ("train_loss", "val_accuracy", "lr"):
        expected = logged(rows, key)
        assert [step for step, _ in scalars[key]] == sorted(expected), key  # each step once, in order
        assert dict(scalars[key]) == pytest.approx(expected, rel=1e-6), key  # float32 in TensorBoard
    # Both runs together: 3 epochs of validation, training losses past the first run's end.
    assert len(scalars["val_accuracy"]) == 3
    assert scalars["train_loss"][-1][0] > tracked_runs["first"].steps


def wandb_logs(run_dir, run_id):
    """The records of each offline W&B log of the run, keyed by the epochs its config asked for."""
    logs = {}
    for path in (run_dir / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"):
        records = read_wandb_records(path)
        kinds = [record.WhichOneof("record_type") for record in records]
        assert kinds[-1] == "exit", f"{path} ({path.stat().st_size} bytes) is not finished: {kinds}"
        logs[wandb_config(records)["training_options"]["n_epochs"]] = records
    return logs


def test_offline_wandb_run_holds_history_and_config(tracked_runs):
    first_rows, run_id = tracked_runs["first_rows"], tracked_runs["first_run_id"]
    first = wandb_logs(tracked_runs["run_dir"], run_id)[2]  # the first run asked for 2 epochs
    config = wandb_config(first)
    assert config["experiment_options"]["trackers"] == ["wandb", "tensorboard"]
    assert config["training_options"]["optimizer"]["lr"] == 0.003
    history = wandb_history(first)
    for key in ("train_loss", "val_accuracy"):
        expected = logged(first_rows, key)
        assert expected and {step: history[step][key] for step in expected} == pytest.approx(expected, rel=1e-9)
    assert max(history) == tracked_runs["first"].steps


def test_resume_continues_the_same_wandb_run(tracked_runs):
    run_dir, run_id = tracked_runs["run_dir"], tracked_runs["first_run_id"]
    assert json.loads((run_dir / "last" / "state.json").read_text())["run_id"] == run_id
    logs = wandb_logs(run_dir, run_id)
    assert sorted(logs) == [2, 3]  # one offline log per start; `wandb sync` uploads both into run `run_id`
    assert all(r.run.run_id == run_id for records in logs.values() for r in records if r.WhichOneof("record_type") == "run")
    first, resumed = wandb_history(logs[2]), wandb_history(logs[3])
    assert min(resumed) > max(first) == tracked_runs["first"].steps
    assert max(resumed) == tracked_runs["resumed"].steps
    # Together the two logs hold each logged step once, with the values metrics.jsonl has.
    rows = tracked_runs["rows"]
    assert sorted([*first, *resumed]) == sorted({row["step"] for row in rows})
    history = {**first, **resumed}
    for key in ("train_loss", "val_accuracy"):
        assert {step: history[step][key] for step in logged(rows, key)} == pytest.approx(logged(rows, key), rel=1e-9)


def test_an_offline_resume_starts_in_a_second_of_its_own(tmp_path):
    """wandb names an offline run's directory by the second it starts: a resume within the same
    second would write into the directory of the run it continues."""
    from accelerated_trainer.tracking import wait_past_offline_runs

    started = time.strftime("%Y%m%d_%H%M%S")
    (tmp_path / f"offline-run-{started}-abc123").mkdir()
    wait_past_offline_runs(tmp_path, "other")
    wait_past_offline_runs(tmp_path, "abc123")
    assert time.strftime("%Y%m%d_%H%M%S") != started


# ---------------------------------------------------------------- the console


def test_redirected_progress_is_plain_lines(capfd):
    from accelerated_trainer.tracking import Progress

    progress = Progress(True, n_epochs=2, start_epoch=0)  # pytest's capture: not a terminal
    assert not progress.bars and progress.lines
    for epoch in range(2):
        progress.start_epoch(epoch, total=3)
        for _ in range(3):
            progress.advance()
            progress.show(loss=0.5, samples_per_s=1000.0)
        progress.end_epoch(val_accuracy=0.75)
    progress.close()
    out, err = capfd.readouterr()
    lines = out.splitlines()
    assert [line.split(" (")[0] for line in lines] == ["epochs 1/2: loss 0.5, samples_per_s 1000, val_accuracy 0.75",
                                                       "epochs 2/2: loss 0.5, samples_per_s 1000, val_accuracy 0.75"]
    assert err == "" and "\x1b" not in out and "\r" not in out


def test_redirected_progress_reports_a_long_epoch(capfd, monkeypatch):
    from accelerated_trainer import tracking

    monkeypatch.setattr(tracking, "PLAIN_LINE_EVERY_S", 0.0)
    progress = tracking.Progress(True, n_epochs=1, start_epoch=0)
    progress.start_epoch(0, total=2)
    progress.advance()
    assert capfd.readouterr().out.startswith("epoch 0: 1/2 steps (")


def test_disabled_progress_prints_nothing(capfd):
    from accelerated_trainer.tracking import Progress

    progress = Progress(False, n_epochs=1, start_epoch=0)
    progress.start_epoch(0, total=2)
    progress.advance(2)
    progress.end_epoch(val_loss=1.0)
    progress.close()
    assert capfd.readouterr() == ("", "")


@pytest.mark.parametrize("main, progress_bar, terminal, bars", [
    (True, True, True, True), (True, False, True, False), (True, True, False, False), (False, True, True, False)])
def test_datasets_bars_show_only_where_the_runs_own_do(monkeypatch, main, progress_bar, terminal, bars):
    import datasets

    from accelerated_trainer import tracking

    monkeypatch.setattr(tracking, "interactive", lambda: terminal)
    verbosity = datasets.logging.get_verbosity()
    datasets.enable_progress_bars()
    try:
        tracking.configure_console(main, progress_bar)
        assert datasets.is_progress_bar_enabled() is bars
        assert (datasets.logging.get_verbosity() == datasets.logging.ERROR) is (not main)
    finally:
        datasets.enable_progress_bars()
        datasets.logging.set_verbosity(verbosity)


def test_wandb_prints_to_the_run_directory_but_the_sync_line(tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("WANDB_API_KEY", "")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    tracker = make_tracker(tmp_path, ["wandb"], mode="offline")
    tracker.start()
    tracker.log({"train_loss": 1.0}, step=1)
    tracker.finish({"steps": 1})
    out, err = capfd.readouterr()
    wandb_lines = [line for line in (out + err).splitlines() if line.startswith("wandb")]
    assert wandb_lines == [f"wandb: upload this run with `wandb sync {tmp_path / 'wandb'}/offline-run-*-{tracker.run_id}`"]
    assert "wandb online" not in out + err
    log = (tmp_path / "wandb.log").read_text()
    for printed in ("Tracking run with wandb version", "Run summary:", "steps 1", "wandb sync"):
        assert printed in log
    # Once the run is finished, wandb prints to the console again.
    wandb.termlog("after the run")
    assert "wandb: after the run" in capfd.readouterr().err
