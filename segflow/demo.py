"""``make demo``: the main job on a synthetic volume, end to end, on this machine.

Runs what segflow can do so far and prints where the outputs are.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from unet_core import UNet, UNetConfig
from unet_core.predict import predict


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("demo-output"))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    config = UNetConfig(ndim=2, depth=4, base_channels=8)
    print(f"paper geometry: 572x572 -> {config.output_shape((572, 572))}, context {config.context}")
    model = UNet(config).eval()
    image = rng.normal(size=(300, 260)).astype(np.float32)
    t0 = time.perf_counter()
    reference = predict(model, image)
    t1 = time.perf_counter()
    tiled = predict(model, image, tile_shape=(220, 220), batch_size=2)
    t2 = time.perf_counter()
    result = {
        "image": list(image.shape),
        "whole_pass_s": round(t1 - t0, 3),
        "tiled_s": round(t2 - t1, 3),
        "tiled_equals_whole_bitwise": bool(np.array_equal(tiled, reference)),
    }
    print(json.dumps(result))
    if not result["tiled_equals_whole_bitwise"]:
        raise SystemExit("tiled prediction differs from the whole-image pass")


if __name__ == "__main__":
    main()
