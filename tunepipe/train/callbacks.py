"""Trainer callbacks: one progress line per logging step, the loss curve (CSV + PNG) for `dvc plots`, and the same
figures as MLflow metric history.

    [sft] step 40/120 | loss 1.2345 | lr 1.80e-03 | 2,310 tok/s | pad 3.1% | rss 812 MB

`tok/s` is effective throughput: real (non-pad) tokens handed to the model since the previous line, divided by the
wall time since then, summed over all processes. `pad` is the share of computed positions that were padding.
Only the main process prints, writes files and logs to MLflow.
"""

from __future__ import annotations

import csv
import logging
import math
import resource
import sys
import time
from pathlib import Path

from transformers import TrainerCallback

from tunepipe.train.collators import TokenCounter

log = logging.getLogger("tunepipe.train")


def peak_memory_mb() -> dict[str, float]:
    """Peak resident memory of this process (and peak GPU memory allocated, when a GPU is used), in MB."""
    import torch

    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux
    out = {"peak_rss_mb": round(rss_kb / 1024, 1)}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


def _all_reduce(values: list[float]) -> list[float]:
    """Sum across processes when running distributed (every rank calls on_log), else unchanged."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    device = "cuda" if torch.cuda.is_available() and dist.get_backend() == "nccl" else "cpu"
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


class ProgressCallback(TrainerCallback):
    """Per-log-step line (step, loss, lr, effective tokens/s, padding share, peak memory) and run totals.

    Throughput counts only the optimizer steps themselves (on_step_begin -> on_step_end: forward, backward, optimizer),
    not evaluation or checkpoint saving. The token total is kept in `state.num_input_tokens_seen`, so it is saved in
    checkpoints and continues after a resume.
    """

    def __init__(self, stage: str, counter: TokenCounter):
        self.stage = stage
        self.counter = counter
        self.totals = {"tokens": 0.0, "label_tokens": 0.0, "slots": 0.0}
        self.train_seconds = 0.0
        self._window = [0.0, 0.0, 0.0, 0.0]  # tokens, labels, slots, seconds since the last line
        self.last_tokens_per_second: float | None = None  # of the latest logging step (MetricHistoryCallback)
        self._seen = (0, 0, 0)
        self._step_start: float | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self._seen = (self.counter.tokens, self.counter.label_tokens, self.counter.slots)

    def on_step_begin(self, args, state, control, **kwargs):
        self._step_start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self._step_start is not None:
            elapsed = time.perf_counter() - self._step_start
            self._window[3] += elapsed
            self.train_seconds += elapsed
            self._step_start = None
        if control.should_log or control.should_save or control.should_evaluate or control.should_training_stop:
            self._flush(state)

    def _flush(self, state) -> None:
        current = (self.counter.tokens, self.counter.label_tokens, self.counter.slots)
        local = [c - p for c, p in zip(current, self._seen)]
        self._seen = current
        tokens, labels, slots = _all_reduce(local)  # every rank reaches the same steps
        for i, value in enumerate((tokens, labels, slots)):
            self._window[i] += value
        for key, value in zip(("tokens", "label_tokens", "slots"), (tokens, labels, slots)):
            self.totals[key] += value
        state.num_input_tokens_seen = int(state.num_input_tokens_seen or 0) + int(tokens)

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if "loss" not in logs:  # eval logs and the final summary: no throughput line
            if state.is_world_process_zero and "eval_loss" in logs:
                extra = "".join(f" | {k[5:]} {v:.4g}" for k, v in logs.items()
                                if k.startswith("eval_rewards/") and k.endswith(("accuracies", "margins")))
                log.info("[%s] step %d | eval_loss %.4f%s", self.stage, state.global_step, logs["eval_loss"], extra)
            return
        tokens, _labels, slots, seconds = self._window
        self._window = [0.0, 0.0, 0.0, 0.0]
        tps = tokens / seconds if seconds > 0 else float("nan")
        self.last_tokens_per_second = tps if math.isfinite(tps) else None
        pad = 1 - tokens / slots if slots else 0.0
        mem = peak_memory_mb()
        if state.is_world_process_zero:
            gpu = f" | gpu {mem['peak_gpu_mb']:,.0f} MB" if "peak_gpu_mb" in mem else ""
            log.info("[%s] step %d/%d | loss %.4f | lr %.2e | %s tok/s | pad %.1f%% | rss %s MB%s", self.stage,
                     state.global_step, state.max_steps, logs["loss"], logs.get("learning_rate", float("nan")),
                     f"{tps:,.0f}" if math.isfinite(tps) else "-", 100 * pad, f"{mem['peak_rss_mb']:,.0f}", gpu)
            sys.stderr.flush()

    def on_train_end(self, args, state, control, **kwargs):
        self._flush(state)


class LossCurveCallback(TrainerCallback):
    """Collect (step, loss) and (step, eval_loss) from the trainer logs; `write` saves CSV + PNG (main process).

    On resume the trainer's restored log_history provides the points before the checkpoint, so the curve of a
    resumed run is complete.
    """

    def __init__(self):
        self.points: dict[int, dict[str, float]] = {}

    def on_train_begin(self, args, state, control, **kwargs):
        for entry in state.log_history:  # restored from a checkpoint
            self._add(entry)

    def on_log(self, args, state, control, logs=None, **kwargs):
        self._add({**(logs or {}), "step": state.global_step})

    def _add(self, entry: dict) -> None:
        step = entry.get("step")
        if step is None:
            return
        for key in ("loss", "eval_loss"):
            if key in entry and isinstance(entry[key], (int, float)):
                self.points.setdefault(int(step), {})[key] = float(entry[key])

    def rows(self) -> list[dict[str, float | int | str]]:
        return [{"step": step, "loss": p.get("loss", ""), "eval_loss": p.get("eval_loss", "")}
                for step, p in sorted(self.points.items())]

    def write(self, csv_path: Path, png_path: Path, title: str) -> None:
        from tunepipe.io import atomic_open

        rows = self.rows()
        with atomic_open(csv_path, "w") as handle:
            writer = csv.DictWriter(handle, fieldnames=["step", "loss", "eval_loss"], lineterminator="\n")
            writer.writeheader()
            writer.writerows(rows)
        plot_loss_curve(rows, png_path, title)


def plot_loss_curve(rows: list[dict], png_path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tunepipe.io import atomic_open

    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=100)
    for key, style in (("loss", "-"), ("eval_loss", "o-")):
        xs = [r["step"] for r in rows if r[key] != ""]
        ys = [r[key] for r in rows if r[key] != ""]
        if xs:
            ax.plot(xs, ys, style, label=key.replace("_", " "), markersize=4)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_open(png_path, "wb") as handle:
        fig.savefig(handle, format="png", metadata={"Software": None})  # no version string: stable bytes
    plt.close(fig)


class MetricHistoryCallback(TrainerCallback):
    """Every logging step's figures as MLflow metric history of the stage's run, so MLflow draws the curves: the
    trainer's numeric logs as transformers names them (`loss`, `learning_rate`, `grad_norm`, `epoch`, `eval_loss`,
    TRL's `rewards/*`, ...) plus `step_tokens_per_second` (ProgressCallback's tok/s; a "/" would make MLflow file it
    under a "tokens" section), at step = the optimizer step.

    Logs into `run_id` (default: the process's active MLflow run; none: does nothing), from the main process only.
    The trainer's end-of-training summary (train_runtime, the mean train_loss) is left out: metrics/train_<stage>.json
    holds the run's totals. Add it after ProgressCallback (it reads that callback's throughput)."""

    SUMMARY_KEY = "train_runtime"
    STEP_THROUGHPUT = "step_tokens_per_second"  # not tokens_per_second: that is the run's average (train_<stage>.json)

    def __init__(self, progress: ProgressCallback | None = None, run_id: str | None = None):
        self.progress = progress
        self.run_id = run_id
        self.client = None

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero or self.client is not None:
            return
        mlflow = sys.modules.get("mlflow")  # imported by the stage's tracked run; never imported here for nothing
        active = mlflow.active_run() if mlflow is not None else None
        if self.run_id is None and active is not None:
            self.run_id = active.info.run_id
        if self.run_id is not None:
            self.client = mlflow.MlflowClient(mlflow.get_tracking_uri())
            for entry in state.log_history:  # restored from a checkpoint: the curve starts at step 1 again
                self._log(entry, int(entry.get("step", 0)), tokens_per_second=None)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.client is not None and state.is_world_process_zero:
            self._log(logs or {}, state.global_step,
                      tokens_per_second=self.progress.last_tokens_per_second if self.progress else None)

    def _log(self, logs: dict, step: int, *, tokens_per_second: float | None) -> None:
        from mlflow.entities import Metric

        from tunepipe.tracking.flatten import clean_key

        if self.SUMMARY_KEY in logs:
            return
        values = {clean_key(k): float(v) for k, v in logs.items() if k != "step"
                  and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
        if "loss" in logs and tokens_per_second is not None:
            values[self.STEP_THROUGHPUT] = tokens_per_second
        now = int(time.time() * 1000)
        if values:
            self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])


class StopAfterStep(TrainerCallback):
    """Raise `KeyboardInterrupt` at the end of optimizer step `step`, before that step's checkpoint would be written:
    simulates a run killed mid-way (tests, and `TUNEPIPE_FAIL_AFTER_STEP=N` for trying resume by hand)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            raise KeyboardInterrupt(f"simulated interruption after step {state.global_step}")
        return control
