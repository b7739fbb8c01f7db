"""The bad-input corpus: generated inputs that segflow must refuse in one sentence.

:func:`build` writes every input into one folder (small files, a few MB in all);
:data:`CASES` lists the command lines run on them, each with the documented exit status
and the name the error sentence must contain. Nothing here is committed as a binary.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tifffile
import torch

from segflow.errors import ExitCode
from tasks.store import write_image
from unet_core.checkpoint import FORMAT, VERSION, save_checkpoint, state_digest
from unet_core.config import UNetConfig
from unet_core.model import UNet

#: A sparse TIFF of this many pixels per side declares 10 GB in a few KB of file.
SPARSE_SIDE = 100_000
#: Declared size of the TIFF that cannot fit on the disk (8 TB of float64).
HUGE_SIDE = 1_000_000


@dataclass(frozen=True)
class Case:
    """One bad input: ``argv`` after ``segflow`` ({root} is the corpus folder)."""

    id: str
    argv: tuple[str, ...]
    code: ExitCode
    names: str  # what the error sentence must name (the input, the chunk, the file)
    subprocess: bool = False  # run as a real ``python -m segflow`` process
    s3: str = ""  # "" or "auth" (moto checking credentials) or "down" (no server)
    env: dict[str, str] = field(default_factory=dict)
    #: a value the sentence must name too (as a token: '0' not inside '0.5')
    value: str = ""
    #: a refusal that must write nothing at all: this path ({root}, {id}) must not exist
    writes_nothing: str = ""
    #: seconds the subprocess may take (a FIFO opened by mistake blocks for ever)
    timeout: float = 300


class Evil:
    """Pickles to a call of ``os.system``: a checkpoint holding it must never run it."""

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, ("echo segflow-pwned",))


def _sparse_tiff(path: Path, side: int, dtype: str, tile: int) -> None:
    """A TIFF declaring ``side``×``side`` pixels that stores one tile; the rest are empty."""
    per_side = -(-side // tile)
    count = per_side * per_side

    def tiles():
        yield np.zeros((tile, tile), dtype)
        for _ in range(count - 1):
            yield None

    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        tif.write(tiles(), shape=(side, side), dtype=dtype, tile=(tile, tile), compression="zlib")


def several_series(path: Path, pages: list[np.ndarray]) -> None:
    """A TIFF written page by page with one ``TiffWriter.write()`` call each: tifffile
    records each call as its own series (its default), so reading the first series of the
    file reads one page of it."""
    with tifffile.TiffWriter(path) as tif:
        for page in pages:
            tif.write(page, contiguous=False)


def bomb_checkpoint(path: Path, floats: int) -> None:
    """A checkpoint whose weight entry declares ``floats`` float32 zeros, deflated (about
    1/1000 of that on disk): a decompression bomb. Otherwise a well-formed torch.save
    archive (torch.save itself stores every entry uncompressed)."""
    buf = io.BytesIO()
    config = UNetConfig(ndim=2, depth=1, base_channels=2)
    torch.save(
        {
            "format": FORMAT,
            "version": VERSION,
            "config": config.model_dump_json(),
            "meta": "{}",
            "digest": "",
            "state_dict": {"w": torch.zeros(16)},
        },
        buf,
    )
    zeros = bytes(1 << 22)
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as src, zipfile.ZipFile(path, "w") as out:
        for info in src.infolist():
            if not info.filename.endswith("/data/0"):
                out.writestr(info, src.read(info.filename))
                continue
            entry = zipfile.ZipInfo(info.filename)
            entry.compress_type = zipfile.ZIP_DEFLATED
            with out.open(entry, "w", force_zip64=True) as f:
                left = floats * 4
                while left:
                    n = min(left, len(zeros))
                    f.write(zeros[:n])
                    left -= n


def _checkpoint(path: Path, config: UNetConfig, state: dict[str, torch.Tensor]) -> None:
    """A checkpoint whose digest is right for ``config`` and ``state`` (however they fit)."""
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "config": config.model_dump_json(),
        "meta": json.dumps({}),
        "digest": state_digest(config, state),
        "state_dict": state,
    }
    torch.save(payload, path)


def build(root: Path) -> None:
    """Write every input of the corpus into ``root``."""
    rng = np.random.default_rng(0)
    vol = rng.integers(0, 1000, (6, 32, 40), dtype=np.uint16)
    tifffile.imwrite(root / "good.tif", vol, metadata={"axes": "ZYX"})
    tifffile.imwrite(root / "good2.tif", vol + 1, metadata={"axes": "ZYX"})
    data = (root / "good.tif").read_bytes()
    (root / "truncated.tif").write_bytes(data[: len(data) * 6 // 10])
    (root / "zero.tif").write_bytes(b"")
    (root / "text.tif").write_text("this is not an image\n")
    tifffile.imwrite(root / "u64.tif", vol.astype(np.uint64), metadata={"axes": "ZYX"})
    tifffile.imwrite(root / "complex.tif", vol.astype(np.complex64), metadata={"axes": "ZYX"})
    tifffile.imwrite(root / "time.tif", vol[:5], metadata={"axes": "TYX"})
    # pages of three samples and no metadata: z-slices of RGB, or channels? (a plain stack
    # of single-sample planes is read as ZYX)
    rgb = np.repeat(vol[:5, :, :, None], 3, axis=3)
    tifffile.imwrite(root / "ambiguous.tif", rgb, metadata=None, photometric="rgb")
    for name, values in (
        ("nan.tif", np.full((6, 8, 8), np.nan, np.float32)),
        ("inf.tif", np.tile(np.float32([np.inf, -np.inf, np.nan, np.inf]), (6, 8, 2))),
    ):
        tifffile.imwrite(root / name, values, photometric="minisblack", metadata={"axes": "ZYX"})
    for folder, shapes, dtypes in (
        ("shapes", [(20, 20), (20, 20), (20, 21)], ["uint8"] * 3),
        ("dtypes", [(20, 20)] * 3, ["uint8", "uint16", "uint8"]),
    ):
        (root / folder).mkdir()
        for i, (shape, dtype) in enumerate(zip(shapes, dtypes, strict=True)):
            tifffile.imwrite(root / folder / f"s{i}.tif", np.zeros(shape, dtype))
    (root / "no_tiffs").mkdir()
    (root / "no_tiffs" / "readme.txt").write_text("no images here\n")
    (root / "loopdir").mkdir()
    tifffile.imwrite(root / "loopdir" / "b.tif", np.zeros((8, 8), np.uint8))
    os.symlink("a.tif", root / "loopdir" / "a.tif")  # a.tif -> a.tif: a symlink loop
    os.symlink("loop", root / "loop")
    _sparse_tiff(root / "sparse.tif", SPARSE_SIDE, "uint8", 4096)
    _sparse_tiff(root / "huge.tif", HUGE_SIDE, "float64", 8192)
    # several images in one file: tifffile would hand over the first one only
    page = rng.integers(0, 1000, (64, 64), dtype=np.uint16)
    several_series(root / "series.tif", [page, page + 1, page + 2])
    several_series(root / "mixed_shape.tif", [page] * 5 + [np.zeros((64, 80), np.uint8)])
    several_series(root / "mixed_dtype.tif", [page] * 3 + [page.astype(np.int16)])
    # special files with a TIFF name: opening the pipe blocks, the device never ends
    os.mkfifo(root / "fifo.tif")
    os.symlink("/dev/zero", root / "devzero.tif")
    # training pairs (2D): an image, labels with one object, labels without any
    picture = rng.integers(0, 255, (48, 48), dtype=np.uint8)
    tifffile.imwrite(root / "pic.tif", picture)
    one_object = np.zeros((48, 48), np.uint8)
    one_object[10:30, 12:28] = 1
    tifffile.imwrite(root / "one_object.tif", one_object)
    tifffile.imwrite(root / "no_object.tif", np.zeros((48, 48), np.uint8))

    # destinations that hold other data
    (root / "other.d").mkdir()
    (root / "other.d" / "notes.txt").write_text("someone's notes\n")
    import zarr

    zarr.open_group(root / "other.zarr", mode="w").create_array("data", shape=(4,), dtype="u1")[
        ...
    ] = 7
    from tasks.ingest import ingest_volume

    ingest_volume(str(root / "good.tif"), str(root / "taken.ome.zarr"))

    # OME-Zarr images, sound and damaged
    image = rng.integers(0, 255, (32, 40)).astype(np.uint8)
    write_image(str(root / "img.ome.zarr"), image, "yx", chunks=(16, 16))
    write_image(str(root / "two_ch.ome.zarr"), np.stack([image, image]), "cyx", chunks=(16, 16))
    for name in ("broken_root", "broken_level", "garbage", "export_garbage"):
        shutil.copytree(root / "img.ome.zarr", root / f"{name}.ome.zarr")
    (root / "broken_root.ome.zarr" / "zarr.json").write_text("{broken")
    (root / "broken_level.ome.zarr" / "0" / "zarr.json").write_text('{"zarr_format": 3, ')
    for name in ("garbage", "export_garbage"):
        (root / f"{name}.ome.zarr" / "0" / "c" / "0" / "1").write_bytes(b"not zstd at all" * 5)
    inc = zarr.open_group(root / "incomplete.ome.zarr", mode="w")
    inc.attrs.update({"segflow": {"ingest": {"status": "incomplete"}}})
    (root / "previous.tif").write_bytes(b"an earlier export, to be kept\n")
    (root / "plainfile").write_text("a file, not a folder\n")

    # checkpoints
    torch.manual_seed(0)
    tiny = UNetConfig(ndim=2, depth=1, base_channels=2)
    model = UNet(tiny)
    save_checkpoint(root / "tiny.ckpt", model)
    save_checkpoint(root / "tiny3d.ckpt", UNet(tiny.model_copy(update={"ndim": 3})))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    hostile = UNetConfig(ndim=2, depth=6, base_channels=512, n_classes=256)
    _checkpoint(root / "hostile.ckpt", hostile, state)
    _checkpoint(root / "mismatch.ckpt", tiny.model_copy(update={"depth": 2}), state)
    torch.save({"format": FORMAT, "version": VERSION, "payload": Evil()}, root / "pickled.ckpt")
    (root / "model.txt").write_text("weights? no\n")
    bomb_checkpoint(root / "bomb.ckpt", 16_000_000)  # 64 MB declared in 63 KB
    (root / "zero.ckpt").write_bytes(b"")


def _c(
    id: str, argv: str, code: ExitCode, names: str, **kw: object
) -> Case:  # the argv as one string, split on spaces
    return Case(id, tuple(argv.split()), code, names, **kw)


BAD, STORAGE, CONFLICT, USAGE = (
    ExitCode.BAD_INPUT,
    ExitCode.STORAGE,
    ExitCode.CONFLICT,
    ExitCode.USAGE,
)
SEG = "segment {root}/img.ome.zarr -q --out {root}/out/{id}.zarr"
CASES: list[Case] = [
    # ------------------------------------------------------------------ ingest: files
    *[
        _c(id, f"ingest {{root}}/{src} {{root}}/out/{{id}}.zarr -q{extra}", code, names)
        for id, src, extra, code, names in [
            ("missing-file", "nope.tif", "", BAD, "nope.tif"),
            ("zero-byte", "zero.tif", "", BAD, "zero.tif"),
            ("text-file", "text.tif", "", BAD, "text.tif"),
            ("dtype-uint64", "u64.tif", "", BAD, "u64.tif"),
            ("dtype-complex", "complex.tif", "", BAD, "complex.tif"),
            ("time-series", "time.tif", "", BAD, "time.tif"),
            ("ambiguous-axes", "ambiguous.tif", "", BAD, "--axes"),
            ("axes-wrong-length", "good.tif", " --axes yx", USAGE, "good.tif"),
            ("mixed-shapes", "shapes", "", BAD, "s2.tif"),
            ("mixed-dtypes", "dtypes", "", BAD, "s1.tif"),
            ("no-tiffs", "no_tiffs", "", BAD, "no_tiffs"),
            ("glob-no-match", "shapes/*.tiff", "", BAD, "*.tiff"),
            ("glob-symlink-loop", "loopdir/*.tif", "", BAD, "a.tif"),
            ("symlink-loop", "loop", "", BAD, "loop"),
            ("sparse", "sparse.tif", "", BAD, "sparse.tif"),
            ("no-free-space", "huge.tif", " --allow-sparse --compression none", STORAGE, "free"),
            ("all-nan", "nan.tif", "", BAD, "nan.tif"),
            ("all-inf", "inf.tif", "", BAD, "inf.tif"),
        ]
    ],
    # ----------------------------- ingest: refused before anything is written at DST
    *[
        _c(
            id,
            f"ingest {{root}}/{src} {{root}}/out/{{id}}.zarr -q{extra}",
            code,
            names,
            writes_nothing="{root}/out/{id}.zarr",
            **kw,
        )
        for id, src, extra, code, names, kw in [
            (
                "several-series",
                "series.tif",
                "",
                BAD,
                "series.tif: holds 3 series (tifffile wrote each write() call as its own series)",
                {},
            ),
            (
                "mixed-page-shapes",
                "mixed_shape.tif",
                "",
                BAD,
                "mixed_shape.tif: page 5 is 64×80 uint8 but page 0 is 64×64 uint16",
                {},
            ),
            (
                "mixed-page-dtypes",
                "mixed_dtype.tif",
                "",
                BAD,
                "mixed_dtype.tif: page 3 is 64×64 int16 but page 0 is 64×64 uint16",
                {},
            ),
            *[
                (
                    f"voxel-size-{name}",
                    "good.tif",
                    f" --voxel-size {v},1,1",
                    USAGE,
                    "--voxel-size",
                    {"value": v},
                )
                for name, v in [("inf", "inf"), ("zero", "0"), ("negative", "-0.5"), ("nan", "nan")]
            ],
            (
                "fifo",
                "fifo.tif",
                "",
                BAD,
                "fifo.tif: is a FIFO (named pipe)",
                {"subprocess": True, "timeout": 60},
            ),
            (
                "char-device",
                "devzero.tif",
                "",
                BAD,
                "devzero.tif: is a character device",
                {},
            ),
        ]
    ],
    _c(
        "truncated",
        "ingest {root}/truncated.tif {root}/out/{id}.zarr -q",
        BAD,
        "truncated.tif: the TIFF is truncated",
        subprocess=True,
    ),
    # ------------------------------------------------------- ingest: other data at DST
    _c("dst-other-files", "ingest {root}/good.tif {root}/other.d -q", CONFLICT, "other.d"),
    _c("dst-other-zarr", "ingest {root}/good.tif {root}/other.zarr -q", CONFLICT, "other.zarr"),
    _c(
        "dst-other-image",
        "ingest {root}/good2.tif {root}/taken.ome.zarr -q",
        CONFLICT,
        "taken.ome.zarr",
    ),
    _c(
        "dst-other-files-overwrite",
        "ingest {root}/good.tif {root}/other.d -q --overwrite",
        CONFLICT,
        "other.d",
    ),
    # ------------------------------------------------------------------------- S3
    _c(
        "s3-wrong-credentials",
        "ingest {root}/good.tif s3://images/o.zarr -q",
        STORAGE,
        "s3://images/o.zarr",
        subprocess=True,
        s3="auth",
    ),
    _c(
        "s3-wrong-credentials-source",
        "ingest s3://images/in.tif {root}/out/{id}.zarr -q",
        STORAGE,
        "s3://images/in.tif",
        s3="auth",
    ),
    _c(
        "s3-unreachable",
        "ingest {root}/good.tif s3://images/o.zarr -q",
        STORAGE,
        "s3://images/o.zarr",
        subprocess=True,
        s3="down",
    ),
    # -------------------------------------------------------------------- segment
    _c("segment-missing-store", "segment {root}/nope.zarr -q -m {root}/tiny.ckpt", BAD, "nope"),
    _c(
        "segment-broken-zarr-json",
        "segment {root}/broken_root.ome.zarr -q -m {root}/tiny.ckpt",
        BAD,
        "broken_root.ome.zarr/zarr.json",
    ),
    _c(
        "segment-broken-array-json",
        "segment {root}/broken_level.ome.zarr -q -m {root}/tiny.ckpt",
        BAD,
        "broken_level.ome.zarr/0/zarr.json",
    ),
    _c(
        "segment-incomplete-ingest",
        "segment {root}/incomplete.ome.zarr -q -m {root}/tiny.ckpt",
        BAD,
        "incomplete.ome.zarr",
    ),
    _c(
        "segment-garbage-chunk",
        "segment {root}/garbage.ome.zarr -q -m {root}/tiny.ckpt --out {root}/out/{id}.zarr",
        BAD,
        "garbage.ome.zarr/0/c/0/1",
        subprocess=True,
    ),
    _c("segment-text-checkpoint", SEG + " -m {root}/model.txt", BAD, "model.txt"),
    _c("segment-missing-checkpoint", SEG + " -m {root}/nope.ckpt", BAD, "nope.ckpt"),
    _c("segment-hostile-checkpoint", SEG + " -m {root}/hostile.ckpt", BAD, "hostile.ckpt"),
    _c(
        "segment-channel-mismatch",
        "segment {root}/two_ch.ome.zarr -q -m {root}/tiny.ckpt --out {root}/out/{id}.zarr",
        BAD,
        "two_ch.ome.zarr",
    ),
    _c("segment-3d-model-on-2d", SEG + " -m {root}/tiny3d.ckpt", BAD, "img.ome.zarr"),
    _c("segment-bad-channel", SEG + " -m {root}/tiny.ckpt --channel 3", BAD, "channel 3"),
    _c(
        "segment-ambiguous-axes",
        "segment {root}/ambiguous.tif -q -m {root}/tiny.ckpt --out {root}/out/{id}.zarr",
        BAD,
        "--axes",
    ),
    _c(
        "predict-ambiguous-axes",
        "predict {root}/ambiguous.tif -q -m {root}/tiny.ckpt --out {root}/out/{id}",
        BAD,
        "--axes",
    ),
    _c(
        "segment-fifo",
        "segment {root}/fifo.tif -q -m {root}/tiny.ckpt --out {root}/out/{id}.zarr",
        BAD,
        "fifo.tif: is a FIFO (named pipe)",
        subprocess=True,
        timeout=60,
        writes_nothing="{root}/out/{id}.zarr",
    ),
    _c(
        "segment-char-device",
        "segment {root}/devzero.tif -q -m {root}/tiny.ckpt --out {root}/out/{id}.zarr",
        BAD,
        "devzero.tif: is a character device",
        writes_nothing="{root}/out/{id}.zarr",
    ),
    # ------------------------------------------------------------------- training
    *[
        _c(id, f"train {pairs} --out {{root}}/out/{{id}}.ckpt -q", BAD, names, **kw)
        for id, pairs, names, kw in [
            (
                "train-labels-without-objects",
                "--image {root}/pic.tif --labels {root}/no_object.tif",
                "no_object.tif: holds no object: every voxel is 0",
                {"writes_nothing": "{root}/out/{id}.ckpt"},
            ),
            (
                "train-second-pair-without-objects",
                "--image {root}/pic.tif --labels {root}/one_object.tif "
                "--image {root}/pic.tif --labels {root}/no_object.tif",
                "no_object.tif: holds no object: every voxel is 0",
                {"writes_nothing": "{root}/out/{id}.ckpt"},
            ),
            (
                "train-fifo-image",
                "--image {root}/fifo.tif --labels {root}/one_object.tif",
                "fifo.tif: is a FIFO (named pipe)",
                {"subprocess": True, "timeout": 60},
            ),
            (
                "train-char-device-labels",
                "--image {root}/pic.tif --labels {root}/devzero.tif",
                "devzero.tif: is a character device",
                {},
            ),
            (
                "train-several-series",
                "--image {root}/series.tif --labels {root}/one_object.tif",
                "series.tif: holds 3 series",
                {},
            ),
        ]
    ],
    # ---------------------------------------------------------------- checkpoints
    _c(
        "model-info-hostile",
        "model info {root}/hostile.ckpt",
        BAD,
        "hostile.ckpt",
        subprocess=True,
    ),
    _c("model-info-mismatch", "model info {root}/mismatch.ckpt", BAD, "mismatch.ckpt"),
    _c("model-info-pickled-code", "model info {root}/pickled.ckpt", BAD, "pickled.ckpt"),
    _c("model-info-zero-byte", "model info {root}/zero.ckpt", BAD, "zero.ckpt"),
    _c("model-info-missing", "model info {root}/nope.ckpt", BAD, "nope.ckpt"),
    _c(
        "model-info-decompression-bomb",
        "model info {root}/bomb.ckpt",
        BAD,
        "bomb.ckpt is not a segflow checkpoint (its zip entries declare 61.0 MiB uncompressed "
        "but the file holds",
        subprocess=True,
    ),
    # ------------------------------------------------------------- export, stitch
    _c(
        "export-missing-labels",
        "export {root}/img.ome.zarr --labels instances --to {root}/out/{id}.tif",
        BAD,
        "instances",
        subprocess=True,
    ),
    _c(
        "export-garbage-chunk",
        "export {root}/export_garbage.ome.zarr --image --to {root}/out/{id}.tif",
        BAD,
        "export_garbage.ome.zarr/0/c/0/1",
    ),
    _c(
        "export-over-a-file-segflow-did-not-make",
        "export {root}/img.ome.zarr --image --to {root}/previous.tif --overwrite",
        CONFLICT,
        "previous.tif",
    ),
    _c(
        "export-into-a-file",
        "export {root}/img.ome.zarr --image --to {root}/plainfile/x.tif",
        CONFLICT,
        "plainfile",
    ),
    _c("export-missing-store", "export {root}/nope.zarr --to {root}/out/{id}.tif", BAD, "nope"),
    _c("stitch-no-labels", "stitch {root}/img.ome.zarr", BAD, "img.ome.zarr"),
    _c("stitch-missing-store", "stitch {root}/nope.zarr", BAD, "nope.zarr"),
]
