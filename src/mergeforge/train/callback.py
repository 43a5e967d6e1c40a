"""A ``transformers.Trainer`` callback that records the curvature artifact while the Trainer
trains, with any optimizer. One line::

    trainer.add_callback(callback := CurvatureCallback())   # or callbacks=[CurvatureCallback()]
    trainer.train()
    trainer.save_model(out)
    callback.save(out)                                      # the artifact beside the final model

Every checkpoint the Trainer saves (``output_dir/checkpoint-N/``) gets its artifact in
``on_save``, when the checkpoint's weights already exist (the artifact carries their
fingerprint). The final ``trainer.save_model()`` happens after ``train()`` returns, where no
callback runs: hence :meth:`CurvatureCallback.save`.

The recorder (:class:`~.recorder.CurvatureRecorder`) hooks the Trainer's torch optimizer (the
one inside accelerate's wrapper), so it records once per optimizer step, after gradient
accumulation and clipping, unscaled under fp16. ``examples`` is recorded steps × the Trainer's
total train batch size (per-device batch × accumulation × processes): exact unless an epoch
ends on a smaller batch. Only the main process writes.

Not supported: resuming from a checkpoint (the statistics restart at the resumed step and cover
only the steps trained since: a warning says so), hyper-parameter search runs (their
checkpoints are in ``run-*`` folders: skipped with a warning), DeepSpeed / FSDP sharded
gradients.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from mergeforge.train.recorder import CurvatureRecorder, resolve_beta2


class CurvatureCallback(TrainerCallback):
    """Record R and C while a ``Trainer`` trains and write the curvature artifact beside every
    saved checkpoint; :meth:`save` writes it beside the final model. Parameters as
    :class:`~.recorder.CurvatureRecorder`'s."""

    def __init__(
        self,
        *,
        variant: str = "ema",
        beta2: float | None = None,
        keep_exp_avg_sq: bool = False,
        params: list[str] | None = None,
    ) -> None:
        # validate now (at add_callback), not when training starts
        resolve_beta2(variant, beta2)
        self.variant, self.beta2, self.params = variant, beta2, params
        self.keep_exp_avg_sq = keep_exp_avg_sq
        self.recorder: CurvatureRecorder | None = None
        self._batch = 0  # examples per optimizer step

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs: Any):
        from accelerate.optimizer import AcceleratedOptimizer

        if self.recorder is not None:
            self.recorder.close()
        if isinstance(optimizer, AcceleratedOptimizer):
            optimizer = optimizer.optimizer  # its step() runs the torch optimizer's hooks
        if state.global_step > 0:
            warnings.warn(
                f"CurvatureCallback: training resumes at step {state.global_step}; the curvature "
                "statistics cover only the steps trained from here",
                stacklevel=2,
            )
        self.recorder = CurvatureRecorder(
            model,
            optimizer=optimizer,
            variant=self.variant,
            beta2=self.beta2,
            keep_exp_avg_sq=self.keep_exp_avg_sq,
            params=self.params,
        )
        self._batch = args.train_batch_size * args.gradient_accumulation_steps * args.world_size

    def on_save(self, args, state, control, **kwargs: Any):
        if not state.is_world_process_zero or self.recorder is None:
            return
        folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if not folder.is_dir():
            warnings.warn(
                f"CurvatureCallback: no checkpoint folder {folder} (a hyper-parameter search "
                "run?); no curvature statistics written for it",
                stacklevel=2,
            )
            return
        self.save(folder)

    def on_train_end(self, args, state, control, **kwargs: Any):
        if self.recorder is not None:
            self.recorder.close()  # the statistics stay for save()

    def save(self, model_dir: str | os.PathLike[str]) -> Path:
        """Write the artifact beside the model saved in ``model_dir`` (after
        ``trainer.save_model(model_dir)``). Returns its path."""
        if self.recorder is None:
            raise RuntimeError("CurvatureCallback.save: the Trainer has not trained yet")
        return self.recorder.save(model_dir, examples=self.recorder.steps * self._batch)
