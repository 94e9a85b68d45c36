"""Progress on a terminal: a tqdm bar with loss, SPL and cosine; Ctrl-C/SIGTERM stop between steps."""

from __future__ import annotations

from pathlib import Path


class TqdmCallbacks:
    """A tqdm bar with loss and SPL; Ctrl-C cancels cleanly between steps."""

    def __init__(self, enabled: bool = True, description: str = "ClassDiffusion"):
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
        if record.cos:  # ClassDiffusion: SPL and each token's EOS cosine
            self.bar.set_postfix(loss=f"{record.loss:.4f}", spl=f"{record.spl:.5f}",
                                 cos=",".join(f"{c:.4f}" for c in record.cos))
        else:  # a method without tokens (Infusion)
            self.bar.set_postfix(loss=f"{record.loss:.4f}")
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
