"""`bench/heldout_variants.py prox=W`: refinement pulled back towards the closed-form layer it starts from.

The ridge repair generalised only with a strong pull to the weights it starts from (ridge 1.0; 0.3 and 3 both
lost on the whole model), while refinement has none: 150 Adam steps may move gate, up and down as far as the
calibration batches ask. This variant adds the same kind of pull to refinement as decoupled decay towards the
starting point (AdamW's weight decay with the closed-form weights as its origin): after every step each
parameter moves a fraction lr x W x (schedule factor) of the way back to where it started. With the shipped step
size (1e-2) W = 10 gives a displacement half-life of about 7 steps at the peak of the schedule; W = 1 about 70.
The pull's lr is that shipped RefineSettings.lr whatever `refine_lr` a config sets: the optimiser's groups hold lr
times each tensor's scale, which cannot be split back apart here.
Measured 2026-12-07 (docs/quality.md): W = 10 gave 1.619x at 50% against 1.585x for the default on the same
machine, so refinement is not overfitting in a way a pull back cures.
"""

from __future__ import annotations

import moeify.split.methods.refine as R


def patch_proximal(strength: float) -> None:
    adam_steps = R.adam_steps
    base_lr = R.RefineSettings.lr

    def proximal_adam_steps(opt, steps, tokens, batch, seed, batch_loss, after_step=None):
        anchors = [[p.detach().clone() for p in group["params"]] for group in opt.param_groups]

        def pull() -> None:
            for group, starts in zip(opt.param_groups, anchors, strict=True):
                # LambdaLR keeps each group's unscheduled lr as initial_lr: their ratio is the schedule factor
                frac = base_lr * strength * group["lr"] / group["initial_lr"]
                for p, p0 in zip(group["params"], starts, strict=True):
                    p.data.sub_(frac * (p.data - p0))
            if after_step is not None:
                after_step()

        return adam_steps(opt, steps, tokens, batch, seed, batch_loss, pull)

    R.adam_steps = proximal_adam_steps
