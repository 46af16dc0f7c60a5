"""The TensorBoard event files the harness writes: TensorBoard's own format, read back by its reader."""

from __future__ import annotations

from pathlib import Path

from harness.tracking import TensorBoardLog, read_scalars, tf_record


def test_records_are_framed_byte_for_byte_as_tensorboards_own_record_writer_frames_them():
    import io

    from tensorboard.summary.writer.record_writer import RecordWriter

    for payload in (b"", b"x", b"\x00\xff" * 100, bytes(range(256)) * 9):
        sink = io.BytesIO()
        RecordWriter(sink).write(payload)
        assert tf_record(payload) == sink.getvalue()


def test_lr_series_and_scalars_read_back_exactly_through_tensorboards_reader(tmp_path):
    log = TensorBoardLog(tmp_path, enabled=True)
    rows = [[0.1 * (step % 3), 0.5] for step in range(1, 101)]  # repeats: the cached summaries
    log.lr_series(1, ["body", "head"], rows[:40])
    log.lr_series(41, ["body", "head"], rows[40:])
    log.scalars(100, {"train/loss": 0.25})
    log.close()
    series = read_scalars(tmp_path)
    assert series["lr/body"] == [(step, float(_f32(0.1 * (step % 3)))) for step in range(1, 101)]
    assert series["lr/head"] == [(step, 0.5) for step in range(1, 101)]
    assert series["train/loss"] == [(100, 0.25)]


def test_flush_puts_every_event_so_far_on_disk_while_the_file_stays_open(tmp_path):
    log = TensorBoardLog(tmp_path, enabled=True)
    log.lr_series(1, ["default"], [[1e-3]] * 7)
    log.flush()
    assert [s for s, _ in read_scalars(tmp_path)["lr/default"]] == list(range(1, 8))
    log.close()


def test_a_resumed_writer_purges_the_points_the_interrupted_one_logged_after_its_checkpoint(tmp_path):
    first = TensorBoardLog(tmp_path, enabled=True)
    first.lr_series(1, ["default"], [[1.0]] * 20)  # the checkpoint was at step 10; 11..20 are lost work
    first.close()
    resumed = TensorBoardLog(tmp_path, enabled=True, purge_step=11)
    resumed.lr_series(11, ["default"], [[2.0]] * 5)
    resumed.close()
    assert len(list(Path(tmp_path, "tb").iterdir())) == 2
    assert read_scalars(tmp_path, keep_duplicates=True)["lr/default"] == \
        [(s, 1.0) for s in range(1, 11)] + [(s, 2.0) for s in range(11, 16)]


def test_a_disabled_log_writes_nothing(tmp_path):
    log = TensorBoardLog(tmp_path, enabled=False)
    log.lr_series(1, ["default"], [[1.0]])
    log.scalars(1, {"a": 1.0})
    log.close()
    assert not (tmp_path / "tb").exists()


def _f32(value: float) -> float:
    import struct

    return struct.unpack("<f", struct.pack("<f", value))[0]


def test_series_events_are_the_bytes_tensorboards_protos_serialize_to(tmp_path):
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.compat.proto.summary_pb2 import Summary

    from harness.tracking import EventFile, scalar_summary_field

    events = EventFile(tmp_path)
    summary = Summary(value=[Summary.Value(tag="lr/default", simple_value=0.25)])
    field = scalar_summary_field([("lr/default", 0.25)])
    start = events.path.stat().st_size
    steps = [1, 127, 128, 300, 16_384, 2**31 + 5]  # varints of 1 to 5 bytes
    for step in steps:
        events.write_series(step, 1234.5, [field])
    events.close()
    expected = b"".join(tf_record(Event(wall_time=1234.5, step=s, summary=summary).SerializeToString())
                        for s in steps)
    assert events.path.read_bytes()[start:] == expected


def test_scalar_summaries_are_the_bytes_tensorboards_protos_serialize_to():
    import math

    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.compat.proto.summary_pb2 import Summary

    from harness.tracking import scalar_summary_field

    cases = [[("lr/default", 1e-3)], [("train/loss", 0.5), ("perf/samples_per_s", 12345.6)],
             [("x" * 200, -0.0)], [("ünïcode/тег", 3.0)], [("a", math.inf), ("b", -math.inf), ("c", 1e39),
                                                            ("d", -1e39), ("e", 1e-50)]]
    for pairs in cases:
        summary = Summary(value=[Summary.Value(tag=t, simple_value=v) for t, v in pairs])
        assert scalar_summary_field(pairs) == Event(summary=summary).SerializeToString(), pairs
    nan = scalar_summary_field([("n", math.nan)])
    parsed = Event.FromString(nan).summary.value[0]
    assert parsed.tag == "n" and math.isnan(parsed.simple_value)
