"""The train-model flow under a real (temporary) Prefect API: checkpoint, report artifact."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from pydantic import ValidationError

from flows.train import TrainParams, report_markdown, train_model
from unet_core import load_checkpoint
from unet_core.synthetic import blobs
from unet_core.training.config import TrainConfig


def test_params_validate_pairs():
    with pytest.raises(ValidationError, match="label"):
        TrainParams(images=["a.tif", "b.tif"], labels=["a_lab.tif"], out="m.ckpt")
    with pytest.raises(ValidationError):
        TrainParams(images=["a.tif"], labels=["l.tif"], out="m.ckpt", config={"steps": 0})
    schema = train_model.parameters.model_dump()
    config = schema["definitions"]["TrainConfig"]["properties"]
    assert config["steps"]["minimum"] == 1
    assert config["steps"]["default"] == TrainConfig().steps
    assert "description" in config["w0"]


def test_train_model_flow_writes_checkpoint_and_report(tmp_path, prefect_api):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    image, labels = blobs((64, 72), rng=5, radius=(4.0, 7.0))
    tifffile.imwrite(tmp_path / "img.tif", image)
    tifffile.imwrite(tmp_path / "lab.tif", labels)
    params = TrainParams(
        images=[str(tmp_path / "img.tif")],
        labels=[str(tmp_path / "lab.tif")],
        out=str(tmp_path / "model.ckpt"),
        config=TrainConfig(
            depth=2, base_channels=4, patch=(60, 60), batch_size=2, steps=3, val_every=3
        ),
    )
    result = train_model(**params.model_dump())
    assert result["steps"] == 3
    assert (tmp_path / "model.ckpt.loss.png").is_file()
    _, meta = load_checkpoint(tmp_path / "model.ckpt")
    assert meta.digest == result["digest"]
    assert meta.object_stats is not None
    assert meta.object_stats.count == int(np.max(labels))
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["train-model-report"]))
        )
    assert artifacts
    text = str(artifacts[0].data)
    assert "Validation mean Dice" in text
    assert str(tmp_path / "model.ckpt.loss.png") in text
    assert text == report_markdown(result)
