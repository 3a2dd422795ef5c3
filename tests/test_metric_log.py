"""The metric log every trainer shares: JSONL rows, TensorBoard scalars, the loss plot."""

from __future__ import annotations

from trainkit import assert_logged_run


def test_rows_reach_jsonl_tensorboard_and_the_plot_and_a_second_logger_appends(tmp_path):
    from mmgen.utils.metric_log import MetricLogger

    log = MetricLogger(tmp_path, loss_keys=("gan",))
    log.log({"step": 10, "loss": 0.9, "gan": -0.2, "note": "text is kept in the JSONL only", "flag": True})
    log.close()
    log = MetricLogger(tmp_path)  # a resumed run continues the file
    log.log({"step": 20, "loss": 0.5, "gan": 0.1})
    png = log.close()
    rows = assert_logged_run(tmp_path)
    assert [r["step"] for r in rows] == [10, 20] and rows[0]["note"].startswith("text")
    assert png == tmp_path / "loss.png"  # a negative curve is drawn on a linear axis instead of failing


def test_a_disabled_logger_writes_nothing(tmp_path):
    from mmgen.utils.metric_log import MetricLogger

    log = MetricLogger(tmp_path, enabled=False)  # ranks other than 0
    log.log({"step": 1, "loss": 1.0})
    assert log.close() is None and list(tmp_path.iterdir()) == []
