"""The hook interface (detectron2's HookBase): every method is a no-op unless overridden."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vissl_vit.engine.trainer import Trainer


class HookBase:
    """Called by the Trainer around training, epochs and steps.

    ``self.trainer`` is set when the hook is registered: a weak proxy (the trainer owns its hooks,
    not the reverse). Hooks are built by name from the HOOKS registry (``build_hooks``). A hook with state that must survive a
    resume returns it from ``state_dict`` (saved in checkpoints under "hooks"/<class name>).
    """

    trainer: Trainer

    def before_train(self) -> None: ...

    def after_train(self) -> None: ...

    def before_epoch(self) -> None: ...

    def after_epoch(self) -> None: ...

    def before_step(self) -> None: ...

    def after_backward(self) -> None:
        """Between backward and the optimizer step: gradients can be read or changed here."""

    def before_optimizer_step(self) -> None:
        """After gradient clipping, right before the optimizer step: ``trainer.last`` holds the
        step's loss and total gradient norm; raising here leaves the weights untouched."""

    def after_step(self) -> None: ...

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None: ...
