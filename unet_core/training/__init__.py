r"""Training the U-Net on annotated images: patches, augmentation, weighted loss, checkpoints.

:func:`~unet_core.training.loop.train` works on NumPy arrays (loading files is
:mod:`tasks.training`'s job)::

    images + labels ──▶ targets (class ids, objects)  ──▶ weight map w(x) per image      data
          │                                                (0 on the validation region)
          ├──▶ global intensity statistics per image ──▶ normalised once, never per patch
          ▼
    every step: random valid-size patches (class-balanced centres), one random warp   sampler
    each (flip, rotation, zoom, elastic) for image, labels and weights; grey values
    ──▶ U-Net (dropout at the bottom) ──▶ weighted softmax cross-entropy (or Dice)       loop
    ──▶ Adam at the scheduled learning rate                                            config
          │
    every epoch: predict the held-out region with the inference machinery (the same
    tiles and numerics as ``segflow segment``) ──▶ Dice / IoU per class          validation
    ──▶ best checkpoint, and the run's state beside it                                  state

Modules: :mod:`.config` (what decides a run, the learning-rate schedule), :mod:`.data`
(pairs, targets, weights, the train/validation split), :mod:`.sampler` (patch shape and
batches), :mod:`.validation`, :mod:`.state` (:class:`~.state.RunState`, saved and resumed
as one) and :mod:`.loop`. Runs are deterministic for a seed, and an interrupted run resumed
from its state ends with the same result as an uninterrupted one.
"""
