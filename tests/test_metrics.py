"""Run metrics: a restart drops what the stopped attempt logged after its last checkpoint."""
import json

from mmpretrain.train.metrics import MetricsLogger, format_duration


def record(step: int, loss: float) -> dict:
    return {"step": step, "loss": loss, "lr": 1e-3, "grad_norm": 1.0, "tokens_per_s": 1.0,
            "step_time": 0.1}


def steps_and_losses(run) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in map(json.loads, (run / "metrics.jsonl").open())]


def test_a_restart_keeps_each_step_once(tmp_path):
    first = MetricsLogger(tmp_path, 6, tensorboard=False)
    for step in range(1, 6):
        first.log(record(step, 10.0 + step))
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 6, "lo')  # the kill cut this line short
    again = MetricsLogger(tmp_path, 6, tensorboard=False, start_step=3)  # resumed at step 3
    assert again.dropped == 3
    for step in range(4, 7):
        again.log(record(step, 20.0 + step))
    assert steps_and_losses(tmp_path) == [(1, 11.0), (2, 12.0), (3, 13.0), (4, 24.0), (5, 25.0),
                                          (6, 26.0)]
    assert MetricsLogger(tmp_path, 6, tensorboard=False, start_step=6).dropped == 0


def test_a_restart_purges_later_tensorboard_events(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    first = MetricsLogger(tmp_path, 5, tensorboard=True)
    for step in range(1, 6):
        first.log(record(step, 10.0 + step))
    first.close()
    again = MetricsLogger(tmp_path, 5, tensorboard=True, start_step=2)
    for step in range(3, 5):
        again.log(record(step, 20.0 + step))
    again.close()
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [
        (1, 11.0), (2, 12.0), (3, 23.0), (4, 24.0)]


def test_format_duration():
    assert [format_duration(s) for s in (0, 59.9, 3725)] == ["0m00s", "0m59s", "1h02m05s"]
