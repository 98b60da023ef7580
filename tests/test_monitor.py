"""Expert-load statistics, metric sinks and the dsv3-report command."""
import glob
import io
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers.wandb_history import history as wandb_history
from megatron_dsv3.cli import report
from megatron_dsv3.run_config import LoggingSection, RunConfig, RunConfigError
from megatron_dsv3.monitor import (ConsoleSink, ExpertLoadTracker, JsonlSink, MetricsLogger, WandbSink,
                                   build_logger, format_console_line, is_logging_rank, max_vio, wandb_log)


def test_max_vio_is_zero_when_balanced_and_E_minus_1_when_collapsed():
    assert max_vio(torch.tensor([10, 10, 10, 10])) == 0.0
    assert max_vio(torch.tensor([40, 0, 0, 0])) == pytest.approx(3.0)
    assert max_vio(torch.tensor([20, 10, 5, 5])) == pytest.approx(20 / 10 - 1)


def test_summary_has_every_key_per_layer_and_overall():
    t = ExpertLoadTracker(2, 4, layer_numbers=[3, 12])
    t.update(3, torch.tensor([10, 10, 10, 10]), torch.zeros(4))
    t.update(12, torch.tensor([40, 0, 0, 0]), torch.tensor([-0.5, 0.1, 0.2, 0.2]))
    s = t.summary()
    stats = ["max_vio", "max_vio_batch", "load_min", "load_max", "load_p50", "load_p90", "load_p99",
             "load_cv", "dead_experts", "bias_mean", "bias_std", "bias_min", "bias_max"]
    for layer in ("layer_03", "layer_12"):
        assert {f"moe/{layer}/{k}" for k in stats} <= set(s)
    overall = ["max_vio_mean", "max_vio_max", "max_vio_batch_mean", "load_cv_mean", "dead_experts",
               "load_p50", "load_p99", "bias_min", "bias_max"]
    assert {f"moe/{k}" for k in overall} <= set(s)
    assert s["moe/layer_03/max_vio"] == 0.0 and s["moe/layer_12/max_vio"] == pytest.approx(3.0)
    assert s["moe/max_vio_mean"] == pytest.approx(1.5) and s["moe/max_vio_max"] == pytest.approx(3.0)
    assert s["moe/layer_12/bias_min"] == pytest.approx(-0.5) and s["moe/bias_max"] == pytest.approx(0.2)
    assert s["moe/layer_03/load_cv"] == 0.0
    assert s["moe/layer_12/load_cv"] == pytest.approx(3 ** 0.5)  # population std 17.32 / mean 10
    assert all(isinstance(v, (int, float)) for v in s.values())


def test_percentiles_match_numpy_linear_interpolation():
    counts = torch.arange(1, 101)  # fractions i / 5050
    t = ExpertLoadTracker(1, 100)
    t.update(0, counts)
    s = t.summary(prefix="x/")
    frac = counts.numpy() / counts.sum().item()
    for p in (50, 90, 99):
        assert s[f"x/layer_00/load_p{p}"] == pytest.approx(np.percentile(frac, p))
    assert s["x/layer_00/load_min"] == pytest.approx(1 / 5050)
    assert s["x/layer_00/load_max"] == pytest.approx(100 / 5050)


def test_dead_experts_count_the_experts_with_no_tokens():
    t = ExpertLoadTracker(2, 6)
    t.update(0, torch.tensor([5, 0, 3, 0, 0, 1]))
    t.update(1, torch.tensor([1, 1, 1, 1, 1, 0]))
    s = t.summary()
    assert s["moe/layer_00/dead_experts"] == 3
    assert s["moe/layer_01/dead_experts"] == 1
    assert s["moe/dead_experts"] == 4


def test_counts_accumulate_until_reset_and_batch_max_vio_averages_steps():
    t = ExpertLoadTracker(1, 4)
    t.update(0, torch.tensor([40, 0, 0, 0]))
    t.update(0, torch.tensor([0, 40, 0, 0]), torch.ones(4))
    s = t.summary()
    assert s["moe/layer_00/max_vio"] == pytest.approx(1.0)  # summed [40, 40, 0, 0]
    assert s["moe/layer_00/max_vio_batch"] == pytest.approx(3.0)  # each step alone
    assert s["moe/layer_00/dead_experts"] == 2
    assert t.histograms() == {"moe/layer_00/load": [0.5, 0.5, 0.0, 0.0], "moe/layer_00/tokens": [40, 40, 0, 0],
                              "moe/layer_00/starved_steps": [1, 0, 2, 2], "moe/layer_00/bias": [1.0] * 4}
    t.reset()
    assert t.summary() == {} and t.histograms() == {}


def test_update_rejects_unknown_layer_and_wrong_shape():
    t = ExpertLoadTracker(2, 4, [5, 6])
    with pytest.raises(KeyError, match="layer 0"):
        t.update(0, torch.ones(4))
    with pytest.raises(ValueError, match="shape"):
        t.update(5, torch.ones(8))
    with pytest.raises(ValueError, match="layer_numbers"):
        ExpertLoadTracker(3, 4, [1, 2])


def test_for_config_names_moe_layers_by_decoder_index():
    class Cfg:
        num_layers, num_routed_experts = 5, 8

        def is_moe_layer(self, i):
            return i >= 2

    t = ExpertLoadTracker.for_config(Cfg())
    assert t.layer_numbers == [2, 3, 4] and t.num_experts == 8


def test_jsonl_sink_writes_one_object_per_line_and_appends_on_resume(tmp_path):
    path = tmp_path / "run" / "metrics.jsonl"
    sink = JsonlSink(path)
    sink.write(1, {"loss": 4.5})
    assert json.loads(path.read_text())["loss"] == 4.5  # flushed before close
    sink.write(2, {"loss": 4.0}, {"moe/layer_00/load": [0.5, 0.5]})
    sink.close()
    sink = JsonlSink(path)
    sink.write(3, {"loss": 3.5})
    sink.close()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3]
    assert lines[1]["moe/layer_00/load"] == [0.5, 0.5]
    assert all("time" in r for r in lines)


_COMPLETE = "".join(json.dumps({"step": s, "loss": 4.0 - s / 10}) + "\n" for s in (10, 20))


@pytest.mark.parametrize("text, kept_steps", [
    (_COMPLETE + '{"step": 30, "loss": 2.', [10, 20]),  # torn mid-record: cut off
    (_COMPLETE + '{"step": 30, "loss": 1.0}', [10, 20, 30]),  # complete but for its newline: kept
    (_COMPLETE + '{"step": 30, "moe/layer_00/load": [' + "0.1, " * 20000, [10, 20]),  # torn, > 64 KiB
    ('{"step": 10, "lo', []),  # killed while writing the first record
], ids=["torn", "unterminated", "torn-long", "torn-only"])
def test_jsonl_sink_resumes_after_a_torn_last_line_without_losing_a_record(tmp_path, text, kept_steps):
    path = tmp_path / "metrics.jsonl"
    path.write_text(text)
    sink = JsonlSink(path)
    sink.write(40, {"loss": 1.5})
    sink.close()
    records = [json.loads(line) for line in path.read_text().splitlines()]  # every line parses
    assert [r["step"] for r in records] == kept_steps + [40]
    assert records[-1]["loss"] == 1.5 and set(records[-1]) == {"step", "time", "loss"}
    assert all(r["loss"] == 4.0 - r["step"] / 10 for r in records[:-1])


def test_console_line_format():
    metrics = {"loss": 4.5123, "mtp_loss": 4.8009, "balance_loss": 0.0012, "tokens_per_s": 1234.4,
               "grad_norm": 0.8312, "lr": 3e-3, "moe/max_vio_mean": 0.4213}
    assert format_console_line(10, metrics, 200) == (
        "step 10/200 | loss 4.512 | mtp 4.801 | bal 0.0012 | 1234 tok/s | grad 0.83 | lr 3.0e-03 | maxvio 0.42")
    assert format_console_line(7, {"loss": 2.0, "other": 1}) == "step 7 | loss 2.000"


def test_logger_prints_expert_max_vio_on_the_next_console_line(tmp_path):
    stream = io.StringIO()
    tracker = ExpertLoadTracker(1, 4)
    tracker.update(0, torch.tensor([40, 0, 0, 0]))
    with MetricsLogger([ConsoleSink(total_steps=20, stream=stream), JsonlSink(tmp_path / "m.jsonl")]) as logger:
        summary = logger.log_expert_load(10, tracker)
        logger.log(10, {"loss": torch.tensor(3.25)})
    assert summary["moe/max_vio_mean"] == pytest.approx(3.0)
    assert tracker.summary() == {}  # reset after logging
    assert stream.getvalue() == "step 10/20 | loss 3.250 | maxvio 3.00\n"
    records = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert records[0]["moe/layer_00/load"] == [1.0, 0.0, 0.0, 0.0] and records[1]["loss"] == 3.25


def test_build_logger_from_logging_section(tmp_path):
    logger = build_logger(LoggingSection(console=False), tmp_path, {"train": {"steps": 100}})
    assert [type(s).__name__ for s in logger.sinks] == ["JsonlSink"]
    logger.log(5, {"loss": 1.0})
    logger.close()
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["step"] == 5
    console = build_logger(LoggingSection(jsonl=False), tmp_path, total_steps=100).sinks[0]
    assert console.total_steps == 100
    with pytest.raises(RunConfigError, match="unknown config key 'logging.wandb_projct'"):
        RunConfig.from_dict({"logging": {"wandb_projct": "x"}})


def test_tensorboard_sink_writes_events_or_explains_the_missing_package(tmp_path, monkeypatch):
    with monkeypatch.context() as hidden:
        hidden.setitem(sys.modules, "torch.utils.tensorboard", None)
        with pytest.raises(ImportError, match="pip install tensorboard"):
            build_logger(LoggingSection(tensorboard=True, console=False, jsonl=False), tmp_path)
    logger = build_logger(LoggingSection(tensorboard=True, console=False, jsonl=False), tmp_path)
    logger.log(1, {"loss": 1.0})
    logger.close()
    assert glob.glob(str(tmp_path / "tensorboard" / "events.out.tfevents.*"))


def test_is_logging_rank_is_the_rank_asked_for_and_every_process_without_distributed(monkeypatch):
    assert is_logging_rank() and is_logging_rank(-1)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 4)
    for rank, first, last in ((0, True, False), (1, False, False), (3, False, True)):
        monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None, rank=rank: rank)
        assert (is_logging_rank(), is_logging_rank(-1)) == (first, last), rank


def _wandb_log(records) -> bytes:
    """A .wandb file as wandb's service writes it: header, then LevelDB-log chunks in 32 KiB blocks."""
    block, chunk_header = wandb_log.BLOCK_BYTES, wandb_log.CHUNK_HEADER.size
    out = bytearray(b":W&B\xe1\xbe\x00")
    for record in records:
        payload, first = record.SerializeToString(), True
        while first or payload:
            room = block - len(out) % block
            if room < chunk_header:
                out += bytes(room)
                continue
            piece, payload = payload[:room - chunk_header], payload[room - chunk_header:]
            kind = {(True, True): wandb_log.FULL, (True, False): wandb_log.FIRST,
                    (False, False): wandb_log.MIDDLE, (False, True): wandb_log.LAST}[first, not payload]
            out += wandb_log.CHUNK_HEADER.pack(0, len(piece), kind) + piece
            first = False
    return bytes(out)


def _history(step, size):
    """A history record of exactly `size` serialized bytes."""
    from wandb.proto import wandb_internal_pb2 as pb

    def record(n):
        return pb.Record(history=pb.HistoryRecord(step=pb.HistoryStep(num=step),
                                                  item=[pb.HistoryItem(key="x", value_json="a" * n)]))
    overhead = len(record(size).SerializeToString()) - size
    assert len(record(size - overhead).SerializeToString()) == size
    return record(size - overhead)


def test_wandb_log_reader_finds_an_exit_record_split_over_blocks_and_waits_for_it(tmp_path):
    from wandb.proto import wandb_internal_pb2 as pb  # wandb is heavy: imported by the tests that use it
    block = wandb_log.BLOCK_BYTES
    exit_record = pb.Record(exit=pb.RunExitRecord(exit_code=0, runtime=7))
    # the 7-byte header, then a history record in chunks over blocks 0-3 that leaves 10 bytes of
    # block 3: 4 * block - 7 - 4 chunk headers - 10; the exit record starts there and ends in block 4
    history = _history(1, 4 * block - 7 - 4 * 7 - 10)
    data = _wandb_log([history, exit_record])
    assert wandb_log.CHUNK_HEADER.unpack_from(data, 4 * block - 10)[2] == wandb_log.FIRST  # exit starts
    assert len(data) > 4 * block  # its LAST chunk opens block 4
    path = tmp_path / "run-x.wandb"
    path.write_bytes(data)
    records = wandb_log.read_records(path)
    assert [r.WhichOneof("record_type") for r in records] == ["history", "exit"]
    assert records[0] == history and records[1].exit.runtime == 7
    assert [r.WhichOneof("record_type") for r in wandb_log.read_records(path, 3)] == ["exit"]
    assert wandb_log.has_exit_record(path)
    wandb_log.wait_for_exit_record(path, timeout_s=0)
    path.write_bytes(data[:-3])  # the service is still writing the exit record
    assert [r.WhichOneof("record_type") for r in wandb_log.read_records(path)] == ["history"]
    with pytest.raises(TimeoutError, match=re.escape(f"offline run {path} 0.2 s after run.finish()")):
        wandb_log.wait_for_exit_record(path, timeout_s=0.2)
    path.write_bytes(b"PK\x03\x04 not a wandb file")
    with pytest.raises(ValueError, match="not a wandb transaction log"):
        wandb_log.read_records(path)


def test_wandb_offline_run_holds_scalars_and_expert_table(tmp_path, monkeypatch):
    import wandb  # heavy: imported by the tests that use it
    for var in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb_home"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    tracker = ExpertLoadTracker(2, 4, [3, 4])
    tracker.update(3, torch.tensor([10, 20, 30, 40]), torch.tensor([0.1, 0.0, -0.1, -0.2]))
    tracker.update(4, torch.tensor([25, 25, 25, 25]))
    sink = WandbSink("dsv3-test", "offline-run", {"lr": 3e-3}, mode="offline", dir=tmp_path, bar_charts=True,
                     settings=wandb.Settings(x_disable_stats=True, console="off"))
    logger = MetricsLogger([sink])
    logger.log_expert_load(10, tracker)
    logger.log(10, {"loss": 4.5})
    logger.log(20, {"loss": 4.0})
    logger.close()
    files = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(files) == 1
    history = {}
    for rec in wandb_log.read_records(files[0]):  # no waiting: close() returned after wandb wrote
        if rec.WhichOneof("record_type") == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in rec.history.item}
            history[rec.history.step.num] = row
    assert history[10]["train/loss"] == 4.5 and history[20]["train/loss"] == 4.0
    assert history[10]["moe/layer_03/max_vio"] == pytest.approx(40 / 25 - 1)
    assert history[10]["moe/layer_03/bias_min"] == pytest.approx(-0.2)
    assert history[10]["moe/expert_load/_type"] == "table-file"
    assert history[10]["moe/expert_load/nrows"] == 8
    table = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "files" / "media" / "table" / "moe" / "expert_load*"))
    rows = json.load(open(table[0]))["data"]
    assert rows[0] == [10, "layer_03", 0, pytest.approx(0.1), 10, pytest.approx(0.1)]
    assert any(k.startswith("moe/layer_04/load_bar") for k in history[10])


def _synthetic_jsonl(path):
    sink = JsonlSink(path)
    tracker = ExpertLoadTracker(2, 4, [3, 4])
    for step, (a, b) in enumerate([([40, 0, 0, 0], [10, 10, 10, 10]), ([12, 10, 9, 9], [10, 10, 10, 10])], 1):
        tracker.update(3, torch.tensor(a), torch.tensor([-0.01, 0.0, 0.01, 0.02]) * step)
        tracker.update(4, torch.tensor(b))
        MetricsLogger([sink]).log_expert_load(step * 10, tracker)
        sink.write(step * 10, {"loss": 5.0 - step, "tokens_per_s": 1000.0 * step})
    sink.close()


def test_report_shows_losses_expert_table_and_per_expert_bars(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _synthetic_jsonl(path)
    out = tmp_path / "report.md"
    assert report.main([str(tmp_path), "--out", str(out)]) == 0
    md = out.read_text()
    assert "| loss | 4 (step 10) | 3 (step 20) |" in md
    assert "| tokens_per_s | 1000 (step 10) | 2000 (step 20) |" in md
    assert "| layer_03 | 3 | 0.2 | 0.2 | " in md  # MaxVio 3 at start, 12/10 - 1 at end
    assert "| 0 | -0.02 | 0.04 |" in md  # dead experts, bias range at the end
    assert "| layer_04 | 0 | 0 |" in md
    assert "| **all** | 1.5 | 0.1 |" in md
    assert "layer_03 step 20 (load / balanced load)" in md
    assert "  e0 |" + "#" * 40 + "| 1.20" in md
    spark = report.build_report(str(path), style="spark")
    assert "layer_04 step 20 |====| min 1.00 max 1.00" in spark  # balanced: mid-ramp


def test_report_drops_records_of_steps_abandoned_by_a_resume(tmp_path):
    path = tmp_path / "m.jsonl"
    lines = [{"step": 10, "loss": 3.0}, {"step": 20, "loss": 9.0}, {"step": 20, "loss": 2.0}, {"step": 30, "loss": 1.0}]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"step": 40, "lo')
    records, bad = report.read_records(str(path))
    assert [(r["step"], r["loss"]) for r in records] == [(10, 3.0), (20, 2.0), (30, 1.0)]
    assert bad == 1


def _report_refusal(capsys, *argv):
    """dsv3-report's exit code and its one-line error; nothing may reach stdout."""
    capsys.readouterr()
    code = report.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("dsv3-report: error: ") and err.count("\n") == 1
    return code, err


def test_report_refuses_a_missing_empty_or_binary_metrics_file(tmp_path, capsys):
    code, err = _report_refusal(capsys, tmp_path / "nowhere.jsonl")
    assert code == 2 and f"no metrics file at {tmp_path / 'nowhere.jsonl'}" in err
    code, err = _report_refusal(capsys, tmp_path / "no_run_dir")
    assert code == 2 and "no metrics file at" in err and "no_run_dir" in err
    code, err = _report_refusal(capsys, tmp_path)  # a run directory without metrics.jsonl
    assert code == 2 and f"no metrics file at {tmp_path / 'metrics.jsonl'}" in err
    (tmp_path / "metrics.jsonl").write_text("\n")
    code, err = _report_refusal(capsys, tmp_path)
    assert code == 2 and err.rstrip().endswith("metrics.jsonl holds no metrics records")
    blob = tmp_path / "weights.bin"
    blob.write_bytes(bytes(range(256)) * 64)
    code, err = _report_refusal(capsys, blob)
    assert code == 2 and f"{blob} holds no metrics records: none of its 65 line(s)" in err  # 64 newlines


def test_report_refuses_an_unwritable_out_path(tmp_path, capsys):
    _synthetic_jsonl(tmp_path / "metrics.jsonl")
    (tmp_path / "a_file").write_text("")
    out = tmp_path / "a_file" / "report.md"  # its parent is a file: unwritable, also for root
    code, err = _report_refusal(capsys, tmp_path, "--out", out)
    assert code == 2 and f"cannot write the report to {out}: Not a directory" in err
    code, err = _report_refusal(capsys, tmp_path, "--out", tmp_path)
    assert code == 2 and f"cannot write the report to {tmp_path}: Is a directory" in err


def test_report_skips_a_torn_last_line_and_says_so(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"step": 10, "loss": 3.0}) + "\n" + json.dumps({"step": 20, "loss": 2.5})
                    + "\n" + '{"step": 30, "loss": 2.')
    assert report.main([str(tmp_path)]) == 0
    md = capsys.readouterr().out
    assert "- steps: 10 .. 20 (2 logged steps)" in md and "- skipped 1 malformed line(s)" in md
    assert "| loss | 3 (step 10) | 2.5 (step 20) |" in md


def test_trackers_of_two_pipeline_stages_merge_into_one_summary():
    whole = ExpertLoadTracker(2, 4, [1, 2])
    first, last = ExpertLoadTracker(2, 4, [1, 2]), ExpertLoadTracker(2, 4, [1, 2])
    counts = {1: torch.tensor([4.0, 1, 1, 2]), 2: torch.tensor([0.0, 3, 3, 2])}
    for n, tracker in ((1, first), (2, last)):
        tracker.update(n, counts[n], torch.full((4,), 0.1 * n))
        whole.update(n, counts[n], torch.full((4,), 0.1 * n))
    first.absorb(last.state())
    assert first.summary() == whole.summary()
    with pytest.raises(ValueError, match=r"layers \[2\] were tracked by both"):
        first.absorb(last.state())


# ----------------------------------------------------------------------------- issue 16: metrics
def test_load_entropy_is_one_when_balanced_and_zero_when_collapsed():
    t = ExpertLoadTracker(3, 4)
    for layer, counts in enumerate(([5, 5, 5, 5], [20, 0, 0, 0], [10, 10, 0, 0])):
        t.update(layer, torch.tensor(counts))
    s = t.summary()
    assert s["moe/layer_00/load_entropy"] == pytest.approx(1.0)
    assert s["moe/layer_01/load_entropy"] == 0.0
    assert s["moe/layer_02/load_entropy"] == pytest.approx(0.5)  # log 2 / log 4
    assert s["moe/load_entropy_mean"] == pytest.approx(0.5)


def test_starved_streaks_count_consecutive_steps_across_logging_resets():
    t = ExpertLoadTracker(1, 4, starved_below=0.25)  # starved below 0.25 x the mean load
    t.update(0, torch.tensor([10, 10, 10, 2]))  # mean 8: expert 3 (2 >= 2) is not starved
    t.update(0, torch.tensor([17, 10, 3, 1]))  # expert 3 starved (1 < 1.9375), expert 2 not (3)
    assert t.summary()["moe/layer_00/starved_experts"] == 1
    t.reset()
    t.update(0, torch.tensor([20, 10, 1, 0]))  # 2 and 3 starved
    s, h = t.summary(), t.histograms()
    assert h["moe/layer_00/starved_steps"] == [0, 0, 1, 2]
    assert s["moe/layer_00/starved_experts"] == 2 and s["moe/layer_00/starved_steps_max"] == 2
    assert s["moe/starved_experts"] == 2 and s["moe/starved_steps_max"] == 2
    t.reset()
    t.update(0, torch.tensor([8, 8, 8, 8]))  # fed again: every streak ends
    assert t.histograms()["moe/layer_00/starved_steps"] == [0, 0, 0, 0]
    with pytest.raises(ValueError, match="starved_below"):
        ExpertLoadTracker(1, 4, starved_below=1.5)


def test_bias_drift_is_the_rms_change_since_the_previous_logging_step():
    t = ExpertLoadTracker(1, 4)
    t.update(0, torch.ones(4), torch.tensor([0.0, 0.0, 0.0, 0.0]))
    assert "moe/layer_00/bias_drift" not in t.summary()  # nothing logged before
    t.reset()
    t.update(0, torch.ones(4), torch.tensor([0.1, -0.1, 0.0, 0.0]))
    t.update(0, torch.ones(4), torch.tensor([0.3, -0.1, 0.1, -0.1]))
    s = t.summary()
    assert s["moe/layer_00/bias_drift"] == pytest.approx(((0.09 + 0.01 + 0.01 + 0.01) / 4) ** 0.5)
    assert s["moe/bias_drift_mean"] == s["moe/layer_00/bias_drift"]


def test_routing_entropy_matches_the_routers_affinities_over_the_global_batch():
    from megatron_dsv3.config import DSV3Config
    from megatron_dsv3.model.moe.router import Router, update_expert_bias

    config = DSV3Config.preset("tiny")
    router = Router(config).train()
    torch.nn.init.normal_(router.weight, std=0.3)
    xs = [torch.randn(2, 16, config.hidden_size) for _ in range(3)]  # three micro-batches
    for x in xs:
        router(x)
    (load,) = update_expert_bias([router], rate=0.01)
    nats = []
    for x in xs:  # each token's entropy of s_i / sum_j s_j, computed here in float64
        s = torch.sigmoid(x.reshape(-1, config.hidden_size).double() @ router.weight.double().t())
        p = s / s.sum(-1, keepdim=True)
        nats.append(-(p * p.log()).sum(-1))
    expected = torch.cat(nats).mean()
    assert load.sum() == 3 * 32 * config.num_experts_per_token
    assert float(router.routing_entropy) == pytest.approx(float(expected), rel=1e-5)
    assert router.routing_entropy_sum == 0  # cleared with the counts
    t = ExpertLoadTracker(1, config.num_routed_experts)
    t.update(0, load, router.expert_bias, router.routing_entropy)
    import math
    assert t.summary()["moe/layer_00/routing_entropy"] == pytest.approx(float(expected) / math.log(8), rel=1e-5)


def test_mtp_counts_its_depth_1_top1_hits_on_device_and_metrics_name_them():
    from megatron_dsv3.config import DSV3Config
    from megatron_dsv3.model.gpt import build_model
    from megatron_dsv3.model.mtp import take_stats
    from megatron_dsv3.monitor import mtp_metrics

    config = DSV3Config.preset("tiny", mtp_num_modules=2)
    model = build_model(config, seed=3).train()
    tokens = torch.randint(0, config.vocab_size, (2, 17), generator=torch.Generator().manual_seed(1))
    normed = {}
    for k, module in enumerate(model.mtp):
        module.norm.register_forward_hook(lambda m, args, out, k=k: normed.__setitem__(k, out.detach()))
    out = model(tokens[:, :-1], labels=tokens[:, 1:])
    labels = tokens[:, 1:]
    stats = take_stats(model.mtp, 2, torch.device("cpu"))
    for k in range(2):  # depth k+1 predicts labels[i + k + 1]: the last k+1 positions have no target
        predicted = model.lm_head(normed[k]).argmax(-1)[:, :16 - (k + 1)]
        hits = (predicted == labels[:, k + 1:]).sum()
        assert stats[k].tolist() == pytest.approx([float(out.mtp_losses[k]), 1.0, float(hits), 2.0 * (15 - k)])
    assert take_stats(model.mtp, 2, torch.device("cpu")).sum() == 0  # read once, then cleared
    model.eval()
    model(tokens[:, :-1], labels=tokens[:, 1:])
    assert take_stats(model.mtp, 2, torch.device("cpu")).sum() == 0  # evaluation does not count
    assert take_stats(torch.nn.ModuleList(), 2, torch.device("cpu")).shape == (2, 4)  # a stage without MTP
    metrics = mtp_metrics(torch.tensor([[6.0, 2, 30, 40], [7.0, 2, 10, 40]]))
    assert metrics == {"mtp/loss_d1": 3.0, "mtp/acceptance_d1": 0.75, "mtp/loss_d2": 3.5,
                       "mtp/acceptance_d2": 0.25, "mtp/acceptance": 0.75}
    assert mtp_metrics(torch.zeros(1, 4)) == {}


def test_dashboards_group_the_trainers_plain_keys():
    from megatron_dsv3.monitor import dashboard_key

    assert [dashboard_key(k) for k in ("loss", "grad_norm", "mtp_loss", "balance_loss", "moe/max_vio_mean",
                                       "mtp/acceptance")] == [
        "train/loss", "train/grad_norm", "mtp/loss", "moe/balance_loss", "moe/max_vio_mean", "mtp/acceptance"]


class _Reads:
    """A LoggingSection that records which of its fields are read."""

    def __init__(self, section):
        object.__setattr__(self, "section", section)
        object.__setattr__(self, "read", set())

    def __getattr__(self, name):
        self.read.add(name)
        return getattr(self.section, name)


def test_every_logging_setting_is_read_and_the_logger_reads_no_other(tmp_path, monkeypatch):
    import dataclasses
    from pathlib import Path

    section = _Reads(LoggingSection(console=True, jsonl=True, tensorboard=False, wandb=False))
    build_logger(section, tmp_path, moe_layers=[1, 2]).close()
    fields = {f.name for f in dataclasses.fields(LoggingSection)}
    assert section.read <= fields
    # the rest are the trainer's; the sinks that are off do not read their own settings
    trainer_reads = fields - section.read - {"wandb_project", "wandb_mode", "wandb_run_name", "wandb_bar_charts"}
    assert trainer_reads == {"interval", "starved_below"}
    source = (Path(__file__).parents[1] / "megatron_dsv3" / "train.py").read_text()
    assert all(f"logging.{name}" in source for name in trainer_reads)
    made = []
    monkeypatch.setattr("megatron_dsv3.monitor.logger.WandbSink", lambda *a, **kw: made.append((a, kw)) or JsonlSink(
        tmp_path / "stand_in.jsonl"))
    on = _Reads(LoggingSection(wandb=True, console=False, wandb_run_name="r", wandb_mode="online"))
    build_logger(on, tmp_path, {"a": 1}, moe_layers=[1, 2]).close()
    assert {"wandb_project", "wandb_mode", "wandb_run_name", "wandb_bar_charts"} <= on.read
    assert made == [(("megatron-dsv3", "r", {"a": 1}, "online"), {"dir": str(tmp_path), "bar_charts": False})]


def test_run_config_takes_the_documented_logging_keys_and_refuses_the_rest_by_name(tmp_path):
    keys = {"interval": 5, "console": False, "jsonl": True, "wandb": True, "wandb_project": "p",
            "wandb_mode": "online", "wandb_run_name": "r", "wandb_bar_charts": True, "tensorboard": True,
            "heatmap_interval": 50, "heatmap_layer": 2, "starved_below": 0.2}
    logging = RunConfig.from_dict({"logging": keys}).logging
    assert {k: getattr(logging, k) for k in keys} == keys
    assert RunConfig.from_dict({}).logging.wandb_mode == "offline"  # online only when asked for
    for given, message in [({"wandb_mode": None}, "logging.wandb_mode=None is not one of offline, online"),
                           ({"starved_below": 1}, "logging.starved_below must be a number in (0, 1)"),
                           ({"heatmap_layer": -1}, "logging.heatmap_layer must be an integer >= 0"),
                           ({"heatmap_every": 5}, "unknown config key 'logging.heatmap_every'")]:
        with pytest.raises(RunConfigError, match=re.escape(message)):
            RunConfig.from_dict({"logging": given})
    with pytest.raises(RunConfigError, match=re.escape("logging.heatmap_layer=0 is not a MoE layer of this model "
                                                       "(MoE layers: 1, 2, 3)")):
        build_logger(LoggingSection(heatmap_layer=0), tmp_path, moe_layers=[1, 2, 3])


# ----------------------------------------------------------------------------- issue 16: a real run
def _chosen_experts(x_BSH, weight_EH, bias_E, cfg) -> torch.Tensor:
    """The routers' choice recomputed here: per token the best `num_limited_groups` groups by the
    sum of their two best biased scores, then the top-k biased scores inside them (by sorting)."""
    biased_TE = torch.sigmoid(x_BSH.reshape(-1, x_BSH.shape[-1]).float() @ weight_EH.float().t()) + bias_E
    grouped = biased_TE.view(biased_TE.shape[0], cfg.num_expert_groups, -1)
    group_score = grouped.sort(dim=-1).values[..., -2:].sum(-1)
    dropped = group_score.argsort(dim=-1, descending=True)[:, cfg.num_limited_groups:]
    grouped = grouped.clone()
    for t, groups_out in enumerate(dropped.tolist()):
        grouped[t, groups_out] = float("-inf")
    return grouped.flatten(1).argsort(dim=-1, descending=True)[:, :cfg.num_experts_per_token]


def test_a_tiny_run_logs_to_wandb_and_tensorboard_what_the_routers_chose(tmp_path, monkeypatch):
    """4 steps, logged every 2 with heatmaps: both dashboards' files hold the grouped keys and the
    heatmap images, and the per-expert token counts equal those recomputed from each router's input
    and bias; MTP acceptance equals the depth-1 head's top-1 hits counted here."""
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from megatron_dsv3 import train

    for var in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb_home"))
    monkeypatch.setenv("WANDB_X_DISABLE_STATS", "true")
    counted, per_step, accepted, labels = {}, [], [0, 0], {}

    def count(layer_number, router, args, _out):
        if router.training and router.count_load:
            ids = _chosen_experts(args[0].detach(), router.weight.detach(), router.expert_bias, router.config)
            counted[layer_number] = counted.get(layer_number, 0) + torch.bincount(ids.flatten(), minlength=8)

    def accept(model, norm, _args, normed):  # depth 1's normalised state, which its head reads
        with torch.no_grad():
            predicted = model.lm_head(normed).argmax(-1)[:, :-1]
        accepted[0] += int((predicted == labels["now"][:, 1:]).sum())
        accepted[1] += predicted.numel()

    build, step = train.Trainer.build, train.Trainer.train_step

    def hooked_build(self):
        build(self)
        for moe in self.model.moe_layers():
            moe.router.register_forward_hook(lambda *a, n=moe.layer_number, r=moe.router: count(n, r, *a[1:]))
        self.model.register_forward_pre_hook(lambda m, a, kw: labels.__setitem__("now", kw["labels"]),
                                             with_kwargs=True)
        self.model.mtp[0].norm.register_forward_hook(lambda *a, model=self.model: accept(model, *a))

    def hooked_step(self):
        result = step(self)
        per_step.append((dict(counted), tuple(accepted)))
        counted.clear()
        accepted[:] = [0, 0]
        return result

    monkeypatch.setattr(train.Trainer, "build", hooked_build)
    monkeypatch.setattr(train.Trainer, "train_step", hooked_step)
    run = tmp_path / "run"
    assert train.main(["train.steps=4", "logging.interval=2", "logging.heatmap_interval=2", "logging.wandb=true",
                       "logging.tensorboard=true", "logging.console=false", "train.device=cpu", "train.seq_length=32",
                       "train.micro_batch_size=2", "train.global_batch_size=4", "checkpoint.save_interval=0",
                       f"checkpoint.dir={run / 'checkpoints'}"]) == 0
    assert len(per_step) == 4
    expected = {}  # (logged step, layer) -> tokens per expert over the two steps it covers
    for logged in (2, 4):
        for counts, _ in per_step[logged - 2:logged]:
            for n, c in counts.items():
                expected[logged, n] = expected.get((logged, n), 0) + c
    assert {n for _, n in expected} == {1, 2, 3}  # MoE layers 1, 2 and the MTP block's
    assert all(int(c.sum()) == 2 * 4 * 32 * 2 for c in expected.values())  # steps x sequences x tokens x top-k
    hits = {logged: sum(a[0] for _, a in per_step[logged - 2:logged]) / sum(a[1] for _, a in per_step[logged - 2:logged])
            for logged in (2, 4)}

    records = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        records.setdefault(record["step"], {}).update(record)
    for (logged, n), c in expected.items():
        assert records[logged][f"moe/layer_{n:02d}/tokens"] == c.tolist(), (logged, n)
        assert records[logged][f"moe/layer_{n:02d}/load"] == pytest.approx((c / c.sum()).tolist())
    assert [records[s]["mtp/acceptance"] for s in (2, 4)] == pytest.approx([hits[2], hits[4]])

    # wandb: grouped keys, the heatmap images, and the table's per-expert counts
    (wandb_file,) = glob.glob(str(run / "wandb" / "offline-run-*" / "run-*.wandb"))
    history = wandb_history(wandb_file)
    media = Path(wandb_file).parent / "files"
    for logged in (2, 4):
        row = history[logged]
        assert row["train/loss"] == pytest.approx(records[logged]["loss"])
        assert row["mtp/acceptance"] == pytest.approx(hits[logged])
        for key in ("moe/layer_01/max_vio", "moe/max_vio_batch_mean", "moe/starved_experts", "moe/routing_entropy_mean",
                    "moe/load_entropy_mean", "moe/balance_loss", "mtp/loss_d1", "train/grad_norm"):
            assert key in row, (logged, key)
        for image in ("load", "bias", "load_over_time"):
            assert row[f"moe/heatmap/{image}/_type"] == "image-file"
            png = Image.open(media / row[f"moe/heatmap/{image}/path"])
            assert png.format == "PNG" and png.width > 400 and png.height > 100
        (table,) = glob.glob(str(media / row["moe/expert_load/path"]))
        for _, layer, expert, _, tokens, _ in json.load(open(table))["data"]:
            assert tokens == int(expected[logged, int(layer.split("_")[1])][expert])
    assert "moe/heatmap/load/_type" not in history.get(1, {}) and 1 not in history

    # TensorBoard: the same scalars, the images, the counts' histograms
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0, "scalars": 0, "histograms": 0})
    events.Reload()
    tags = events.Tags()
    assert {"train/loss", "mtp/loss", "mtp/acceptance", "moe/balance_loss", "moe/layer_03/max_vio",
            "moe/starved_steps_max"} <= set(tags["scalars"])
    assert [e.value for e in events.Scalars("mtp/acceptance")] == pytest.approx([hits[2], hits[4]])
    assert [e.value for e in events.Scalars("train/loss")] == pytest.approx([records[s]["loss"] for s in (2, 4)])
    assert set(tags["images"]) == {"moe/heatmap/load", "moe/heatmap/bias", "moe/heatmap/load_over_time"}
    for tag in tags["images"]:
        shots = events.Images(tag)
        assert [s.step for s in shots] == [2, 4]
        assert Image.open(io.BytesIO(shots[-1].encoded_image_string)).size == (shots[-1].width, shots[-1].height)
    for n in (1, 2, 3):
        (last,) = [h for h in events.Histograms(f"moe/layer_{n:02d}/tokens") if h.step == 4]
        assert last.histogram_value.sum == pytest.approx(float(expected[4, n].sum()))


class _ImageSink:
    """A dashboard stand-in: records the steps and images it is given."""

    def __init__(self):
        self.images: dict[int, dict] = {}

    def write(self, step, scalars, arrays=None):
        pass

    def write_images(self, step, images):
        self.images[step] = images

    def close(self):
        pass


def _load_steps(logger, steps, last):
    tracker = ExpertLoadTracker(2, 4, [1, 3])
    for step in steps:
        tracker.update(1, torch.tensor([step, 1, 1, 1]), torch.full((4,), 0.01 * step))
        tracker.update(3, torch.tensor([1, 1, 1, 5]), torch.zeros(4))
        logger.log_expert_load(step, tracker, last=step == last)


def test_heatmaps_are_drawn_from_each_multiple_of_the_interval_and_at_the_last_step():
    sink = _ImageSink()
    _load_steps(MetricsLogger([sink], heatmap_interval=5), (3, 6, 9, 13), last=None)
    assert sorted(sink.images) == [6, 13]  # 13: the first logged step from 10
    images = sink.images[13]
    assert sorted(images) == ["moe/heatmap/bias", "moe/heatmap/load", "moe/heatmap/load_over_time"]
    for rgb in images.values():
        assert rgb.dtype.name == "uint8" and rgb.ndim == 3 and rgb.shape[2] == 3 and rgb.shape[1] > 400
        assert len({tuple(p) for p in rgb.reshape(-1, 3)[::7]}) > 20, "a blank image"
    # at the last step whatever the interval; the load over time of layer 3 alone, a column per logged step
    chosen = _ImageSink()
    logger = MetricsLogger([chosen], heatmap_interval=10, heatmap_layer=3)
    _load_steps(logger, (3, 6), last=6)
    assert list(chosen.images) == [6]
    assert [s for s, _ in logger._history] == [3, 6]
    assert logger._history[-1][1].tolist() == [0.5, 0.5, 0.5, 2.5]  # layer 3's load / balanced


def test_without_a_dashboard_no_heatmap_is_drawn(monkeypatch, tmp_path):
    from megatron_dsv3.monitor import heatmaps

    monkeypatch.setattr(heatmaps, "layer_expert_map", lambda *a, **k: pytest.fail("drew a heatmap"))
    logger = MetricsLogger([JsonlSink(tmp_path / "m.jsonl")], heatmap_interval=1)
    _load_steps(logger, (1, 2), last=2)
    assert not logger._history
    _load_steps(MetricsLogger([_ImageSink()], heatmap_interval=0), (1, 2), last=2)  # 0: never
