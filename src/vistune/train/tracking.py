"""What a run logs: per-step numbers to OUTPUT_DIR/metrics.jsonl and to the trackers of `report_to`.

Trackers go through accelerate's tracker API (`Accelerator(log_with=...)`, `init_trackers`, `log`), as in
the HF Trainer, so `report_to: [wandb]` or `[mlflow]` works wherever accelerate supports it. TensorBoard
is the default and needs no account.

A resumed run trains again the steps between its checkpoint and the crash. metrics.jsonl drops its rows
after the checkpoint (they are written again); a tracker cannot drop points, so steps it already
received are not sent again: no step appears twice in a tracker.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

from vistune.errors import ConfigError

METRICS_FILE = "metrics.jsonl"
_RUN_ID_FILE = ".tracker_run_id"  # keeps a resumed run in the same wandb/mlflow run


def accelerator_kwargs(report_to: list[str], out: Path) -> dict[str, Any]:
    """`log_with`/`project_dir` for the Accelerator; fails naming the package a tracker needs."""
    if not report_to:
        return {}
    from accelerate.tracking import get_available_trackers

    available = {str(t) for t in get_available_trackers()}
    missing = [k for k in report_to if k not in available]
    if missing:
        raise ConfigError(f"report_to: {missing} is not installed (pip install {' '.join(missing)}), or drop it "
                          "from report_to")
    from accelerate.utils import ProjectConfiguration

    # TensorBoard writes into logging_dir/<project name>: OUTPUT_DIR/tensorboard/vistune
    return {"log_with": report_to,
            "project_config": ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "tensorboard"))}


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Scalars of a nested dict as `a/b` keys: what every tracker stores as hyperparameters."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}/"))
        elif isinstance(value, (int, float, str, bool)):
            flat[f"{prefix}{key}"] = value
    return flat


class Metrics:
    """Per-step numbers (main process writes), tokens/s, and the trackers."""

    def __init__(self, out: Path, accelerator: Any, stage_name: str, hparams: dict[str, Any], resume_step: int,
                 tokens: int, log_every: int) -> None:
        self.path = out / METRICS_FILE
        self.every = log_every
        self.accelerator = accelerator
        self.main = accelerator.is_main_process
        self.logged_upto = 0  # trackers already hold every step up to this one
        if self.main and self.path.is_file():
            rows = [json.loads(r) for r in self.path.read_text().splitlines() if r]
            self.logged_upto = max((r["step"] for r in rows), default=0)
            # On resume, drop rows logged after the checkpoint: those steps are trained (and logged) again.
            kept = [r for r in rows if r["step"] <= resume_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        if accelerator.log_with:
            run_id = self._run_id(out)
            accelerator.init_trackers("vistune", config=_flat(hparams),
                                      init_kwargs={"wandb": {"name": stage_name, "id": run_id, "resume": "allow"},
                                                   "mlflow": {"run_name": stage_name}})
        self.t_last, self.tokens_last = time.perf_counter(), tokens

    def _run_id(self, out: Path) -> str:
        path = out / _RUN_ID_FILE
        if self.main and not path.is_file():
            path.write_text(uuid.uuid4().hex[:16])
        return path.read_text().strip() if path.is_file() else ""

    def step(self, step: int, tokens: int, loss: float, lr: float, grad_norm: float | None, samples: int,
             val_loss: float | None = None) -> dict:
        now = time.perf_counter()
        step_s = max(now - self.t_last, 1e-9)
        tok_s = (tokens - self.tokens_last) / step_s
        self.t_last, self.tokens_last = now, tokens
        row = {"step": step, "loss": loss, "lr": lr, "tokens_per_s": tok_s, "grad_norm": grad_norm,
               "samples": samples, "step_s": step_s}
        if val_loss is not None:
            row["val_loss"] = val_loss
        if self.main and (step % self.every == 0 or val_loss is not None):
            with self.path.open("a") as f:
                f.write(json.dumps(row) + "\n")
            if step > self.logged_upto and self.accelerator.trackers:
                values = {("val/loss" if k == "val_loss" else f"train/{k}"): v for k, v in row.items()
                          if k != "step" and v is not None}
                self.accelerator.log(values, step=step)
        return row

    def close(self) -> None:
        if self.accelerator.trackers:
            self.accelerator.end_training()
