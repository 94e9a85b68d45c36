"""Progress on a terminal: a tqdm bar with the loss and the method's terms; Ctrl-C/SIGTERM stop between steps."""

from __future__ import annotations

from pathlib import Path


def step_postfix(record) -> dict[str, str]:
    """The loss, each loss term and each per-concept diagnostic the method reported, formatted."""
    postfix = {"loss": f"{record.loss:.4f}"}
    postfix.update({name: f"{value:.5f}" for name, value in record.terms.items()})
    postfix.update({name: ",".join(f"{v:.4f}" for v in values) for name, values in record.diagnostics.items()})
    return postfix


class TqdmCallbacks:
    """A tqdm bar with the loss and the method's terms; Ctrl-C cancels cleanly between steps."""

    def __init__(self, enabled: bool = True, description: str = "training"):
        self.enabled = enabled
        self.description = description
        self.bar = None
        self.stop_requested = False

    def on_step(self, record, total_steps: int) -> None:
        if not self.enabled:
            return
        if self.bar is None:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, initial=record.step - 1, desc=self.description, unit="step")
        self.bar.update(1)
        self.bar.set_postfix(step_postfix(record))
        if record.step >= total_steps:
            self.bar.close()

    def should_stop(self) -> bool:
        return self.stop_requested

    def on_validation(self, step: int, images, grid, path) -> None:
        if self.enabled and path is not None:
            (self.bar.write if self.bar else print)(f"validation at step {step}: {path}")

    def on_checkpoint(self, path: Path) -> None:
        if self.enabled:
            (self.bar.write if self.bar else print)(f"checkpoint: {path}")
