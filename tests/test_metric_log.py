"""The metric log every trainer shares: JSONL rows, TensorBoard scalars, the loss plot."""

from __future__ import annotations

from trainkit import assert_logged_run


def test_rows_reach_jsonl_tensorboard_and_the_plot_and_a_second_logger_appends(tmp_path):
    from mmgen.utils.metric_log import MetricLogger

    log = MetricLogger(tmp_path, loss_keys=("gan",))
    log.log({"step": 10, "loss": 0.9, "gan": -0.2, "note": "text is kept in the JSONL only", "flag": True})
    log.close()
    log = MetricLogger(tmp_path, start_step=10)  # a run resumed at step 10 continues the file
    log.log({"step": 20, "loss": 0.5, "gan": 0.1})
    png = log.close()
    rows = assert_logged_run(tmp_path)
    assert [r["step"] for r in rows] == [10, 20] and rows[0]["note"].startswith("text")
    assert png == tmp_path / "loss.png"  # a negative curve is drawn on a linear axis instead of failing


def test_a_resumed_run_logs_each_step_once_and_a_new_run_starts_empty(tmp_path):
    from mmgen.utils.metric_log import MetricLogger

    log = MetricLogger(tmp_path)
    for step in (1, 2, 3, 4):  # the run stops after logging step 4; its last checkpoint was step 2
        log.log({"step": step, "loss": 1.0 / step})
    log.close()
    log = MetricLogger(tmp_path, start_step=2)
    for step in (3, 4, 5):
        log.log({"step": step, "loss": 2.0 / step})
    log.close()
    rows = assert_logged_run(tmp_path)  # TensorBoard too: steps 3 and 4 of the stopped run are hidden
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 1.0), (2, 0.5), (3, 2 / 3), (4, 0.5), (5, 0.4)]

    log = MetricLogger(tmp_path)  # a new run in the same directory
    log.log({"step": 1, "loss": 3.0})
    log.close()
    assert [(r["step"], r["loss"]) for r in assert_logged_run(tmp_path)] == [(1, 3.0)]


def test_a_disabled_logger_writes_nothing(tmp_path):
    from mmgen.utils.metric_log import MetricLogger

    log = MetricLogger(tmp_path, enabled=False)  # ranks other than 0
    log.log({"step": 1, "loss": 1.0})
    assert log.close() is None and list(tmp_path.iterdir()) == []
