"""Monitoring: expert-load and MTP metrics, heatmap images, and the sinks (JSONL, wandb, TensorBoard, console)."""
from .expert_load import ExpertLoadTracker, bias_stats, fraction_stats, load_stats, max_vio
from .logger import METRICS_FILENAME, MetricsLogger, build_logger, is_logging_rank
from .mtp import mtp_metrics
from .sinks import ConsoleSink, JsonlSink, TensorBoardSink, WandbSink, dashboard_key, format_console_line

__all__ = [
    "ExpertLoadTracker", "max_vio", "load_stats", "fraction_stats", "bias_stats",
    "MetricsLogger", "build_logger", "is_logging_rank", "METRICS_FILENAME",
    "JsonlSink", "WandbSink", "TensorBoardSink", "ConsoleSink", "format_console_line", "dashboard_key",
    "mtp_metrics",
]
