"""What a run of `lorakit.train.trainer.train` has done and where it says so: the step's figures (`StepStats`), the
run so far (`Progress`, which checkpoints carry), its reports (`RunLog`: ``log.jsonl``, TensorBoard, a progress bar or
log lines) and what `train` returns (`TrainResult`)."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from ..core.files import append_text, write_text
from ..errors import OutputError, TrainingError
from .config import TrainConfig

logger = logging.getLogger(__name__)

LOG_FILE = "log.jsonl"


class StepStats(NamedTuple):
    loss: float  # task loss, mean over the step's micro-batches (and ranks)
    regularizer: float | None
    grad_norm: float  # before clipping
    real: int  # tokens without padding
    padded: int  # tokens with padding (what the model computed)
    seconds: float


@dataclass
class Progress:
    """Everything about the run so far that a checkpoint must carry besides tensors."""

    step: int = 0
    losses: list[float] = field(default_factory=list)
    evals: list[dict[str, float]] = field(default_factory=list)
    real_tokens: int = 0
    padded_tokens: int = 0
    train_seconds: float = 0.0

    def add(self, stats: StepStats) -> None:
        self.step += 1
        self.losses.append(stats.loss)
        self.real_tokens += stats.real
        self.padded_tokens += stats.padded
        self.train_seconds += stats.seconds


@dataclass
class TrainResult:
    """What a run did.  ``losses[i]`` is the training loss of step ``i + 1`` (the task loss, averaged over
    the step's micro-batches); ``evals`` holds ``{"step": s, "score": x}`` (or the eval function's keys)."""

    losses: list[float]
    evals: list[dict[str, float]]
    seconds: float
    peak_memory_mib: float
    tokens_per_second: float
    padded_tokens_per_second: float
    trainable_params: int
    steps: int
    adapter_dir: str | None = None

    def steps_to_reach(self, target: float, window: int = 10) -> int | None:
        """First step at which the mean of the last ``window`` losses is at or below ``target``."""
        for i in range(len(self.losses)):
            recent = self.losses[max(0, i - window + 1): i + 1]
            if sum(recent) / len(recent) <= target:
                return i + 1
        return None

    def summary(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def read_log(path: Path) -> list[dict[str, Any]]:
    """The records of a ``log.jsonl``; a line that is not a JSON object (a torn tail after a crash, power loss
    or a full disk) is dropped with a warning."""
    records, torn = [], []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        try:
            record = json.loads(line) if line.strip() else None
        except (json.JSONDecodeError, RecursionError):
            record = None
        if isinstance(record, dict):
            records.append(record)
        elif line.strip():
            torn.append(number)
    if torn:
        logger.warning("%s: dropped %d unreadable line(s) (%s), e.g. a record torn by a crash", path, len(torn),
                       ", ".join(map(str, torn[:5])))
    return records


def _summary_writer(directory: Path) -> Any:
    """A TensorBoard writer if the ``tensorboard`` package is installed, else None."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(directory / "tensorboard"))


def _progress_bar(total: int, initial: int) -> Any:
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=initial, desc="train", dynamic_ncols=True)


class RunLog:
    """Where a run reports: ``log.jsonl`` and TensorBoard (with an output directory), a progress bar (tqdm if
    installed) or else a logging line every ``log_every`` steps.  Silent on ranks other than 0."""

    def __init__(self, out: Path | None, config: TrainConfig, start_step: int, main: bool):
        self.config, self.main = config, main
        self.jsonl = self.tb = self.bar = None
        if out is not None and main:
            out.mkdir(parents=True, exist_ok=True)
            self.jsonl = out / LOG_FILE
            kept = []
            if config.resume and self.jsonl.is_file() and not self.jsonl.is_symlink():
                # records written after the checkpoint will be replayed
                kept = [json.dumps(r) for r in read_log(self.jsonl) if r.get("step", 0) <= start_step]
            write_text(self.jsonl, "".join(line + "\n" for line in kept))  # a planted symlink is replaced
            self.tb = _summary_writer(out)
        if config.progress and main:
            self.bar = _progress_bar(config.steps, start_step)
        self.window_start, self.window_real, self.window_padded = time.perf_counter(), 0, 0

    def step(self, step: int, stats: StepStats, lr: float, extra: dict[str, float]) -> None:
        self.window_real += stats.real
        self.window_padded += stats.padded
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{stats.loss:.4f}", lr=f"{lr:.2e}",
                                 tok_s=f"{stats.real / max(stats.seconds, 1e-9):.0f}")
        if not self.config.log_every or (step % self.config.log_every and step != self.config.steps):
            return
        seconds = max(time.perf_counter() - self.window_start, 1e-9)
        record = {"type": "train", "step": step, "loss": stats.loss, "lr": lr, "grad_norm": stats.grad_norm,
                  "tokens_per_s": self.window_real / seconds, "padded_tokens_per_s": self.window_padded / seconds,
                  **({"regularizer": stats.regularizer} if stats.regularizer is not None else {}), **extra}
        self.write(record)
        if self.bar is None and self.main:
            logger.info("step %d/%d  loss %.4f  lr %.3g  %.0f tokens/s (%.0f padded)", step, self.config.steps,
                        stats.loss, lr, record["tokens_per_s"], record["padded_tokens_per_s"])
        self.window_start, self.window_real, self.window_padded = time.perf_counter(), 0, 0

    def write(self, record: dict[str, Any]) -> None:
        if self.jsonl is not None:
            try:
                append_text(self.jsonl, json.dumps(record) + "\n")
            except OutputError as err:
                raise TrainingError(f"{err}; the checkpoints are unaffected: fix that and rerun with resume") from None
        if self.tb is not None:
            for key, value in record.items():
                if key not in ("type", "step") and isinstance(value, (int, float)):
                    self.tb.add_scalar(f"{record['type']}/{key}", value, record["step"])

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
