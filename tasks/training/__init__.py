"""Training from files: read image/label pairs, train, write the checkpoint and its report.

Pairs are TIFF (also OME-TIFF), OME-Zarr images (local or ``s3://``, level 0), NumPy
``.npy`` files or PNG/JPEG images (:mod:`.inputs`). Everything a run writes sits beside the
checkpoint (:mod:`.report`)::

    model.ckpt                 the best model (config, normalisation, classes, object sizes)
    model.ckpt.state.pt        resume state of the last epoch (optimizer, step, random state)
    model.ckpt.history.json    losses per step and metrics per epoch
    model.ckpt.loss.png        the loss curve and validation Dice
    model.ckpt.val.npz         validation region(s): target, prediction, probabilities

:func:`.run.run_training` does all three. Plain functions only; the Prefect task that wraps
it is in :mod:`flows.train`.
"""
