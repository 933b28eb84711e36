"""Stopping a training run cleanly, and checkpoints that are complete or do not count.

- `StopRequest.install()`: the first SIGTERM or SIGINT asks the trainer to stop after the current optimizer step and
  to save a checkpoint there (`StopOnRequest`); `train` then ends the process as interrupted (exit 143 / 130)
  without writing the adapter, and the next run resumes from that checkpoint. A second signal stops at once.
- `CompleteCheckpoint` writes a marker into each checkpoint once transformers has finished saving it: a checkpoint
  without the marker (killed mid-save, disk full, or an empty `checkpoint-N` folder) is not resumed from
  (tunepipe.train.resume skips it with a warning and removes it).
"""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path

from transformers import TrainerCallback

log = logging.getLogger("tunepipe.train")

COMPLETE_MARKER = "tunepipe_checkpoint_complete"


class StopRequest:
    """The signal that asked this process to stop, if any (signal handlers only run in the main thread)."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def install(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:  # asked twice: no more waiting for the step to end
            raise SystemExit(128 + signum)
        self.signum = signum
        log.warning("%s received: stopping after this step and saving a checkpoint (again to stop at once)",
                    signal.Signals(signum).name)

    @property
    def exit_code(self) -> int | None:
        return None if self.signum is None else 128 + self.signum


class StopOnRequest(TrainerCallback):
    """Turns a StopRequest into the trainer's own "save now, then stop" at the end of the running step."""

    def __init__(self, request: StopRequest):
        self.request = request

    def on_step_end(self, args, state, control, **kwargs):
        if self.request.signum is not None:
            control.should_save = True
            control.should_training_stop = True
        return control


class CompleteCheckpoint(TrainerCallback):
    """transformers calls on_save after a checkpoint is fully written: mark it complete (main process)."""

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if folder.is_dir():
                (folder / COMPLETE_MARKER).write_text(f"{state.global_step}\n")
        return control


def is_complete(checkpoint: Path) -> bool:
    return (checkpoint / COMPLETE_MARKER).is_file() and (checkpoint / "trainer_state.json").is_file()
