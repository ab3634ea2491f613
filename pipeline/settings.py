"""The settings of the segment and refine jobs, in one place: every default and every check.

`SegmentConfig` is what the CLI (`tessera segment`) and the Hydra job (`python -m jobs.segment`)
both build (`RefineConfig`: `tessera refine`, `python -m jobs.refine`); Hydra's structured configs
are generated from them (`pipeline.config`, and each job module's `Layout`). Light to import: the CLI reads
the defaults before any command runs; the checks import what they need.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pipeline.blending import DEFAULT_WINDOW, WINDOWS
from pipeline.crf import CRFSettings
from pipeline.errors import ConfigError
from pipeline.tracking import Tracking

if TYPE_CHECKING:
    from pipeline.inference import InferenceOptions

# A block's default shard and chunk edges (storage.shard / storage.chunk unset): 2048 px shards keep
# a shard's write in memory bounds; 512 px chunks are what readers fetch.
MAX_SHARD = 2048
MAX_CHUNK = 512


@dataclass(frozen=True)
class SegmentConfig:
    """Everything a segment job needs; built once by a front door (CLI or Hydra job).

    Args:
        source: path of the image (GeoTIFF/COG, slide, OME-TIFF).
        model: path of a model bundle, or a registry reference, models:/NAME@ALIAS or
            models:/NAME/VERSION, resolved through `tracking`'s registry (see `pipeline.registry`).
        output: path of the mosaic to write.
        tile, overlap: tile size and minimum overlap in pixels; None takes the bundle's defaults.
        window: blend weight window, one of gaussian, cosine, linear, constant.
        scores: what is blended and stored: "logits" or "probabilities".
        scores_dtype: stored dtype of the scores, float16 or float32.
        tta: average the 8 flips/rotations of each tile (D4 test-time augmentation).
        uncertainty: also store the `uncertainty` layer (normalised entropy of the blended class
            distribution) and, with `tta`, the `spread` layer (the views' blended spread); docs/FORMAT.md.
        level: source pyramid level to segment; None picks the one matching the bundle's resolution.
        block: output block edge in px (a multiple of shard).
        chunk, shard: Zarr chunk and shard edges; None derives them from the block: shard = min(block,
            2048), chunk = min(512, shard).
        workers: model actors; None means one per GPU, or one per CPU core as memory allows.
        threads: torch threads per worker on CPU; None divides the cores among the workers.
        address: the Ray cluster: None starts an embedded Ray; "auto" or "ray://host:10001" joins a cluster.
        skip_background: do not compute tiles without foreground (nodata, or no tissue on slides).
        pipelined: read ahead and write behind in each worker's helper threads; None means on GPU only.
        actors_per_gpu: model actors sharing each GPU (more than 1 helps when one actor's CPU work
            leaves the GPU idle; each holds its own copy of the model in GPU memory).
        compile: torch.compile the model in each worker (slower start, faster steady state on GPU).
        runtime: run a PyTorch bundle's model on another runtime ("onnx": onnxruntime, see
            docs/models.md#runtimes); None runs each bundle on its own.
        overwrite: replace a complete mosaic at `output`, or start an unfinished one over.
        accept_input: run a source whose data type or values differ from what the model was trained on
            (refused otherwise, see `check_input`).
        verbose: let Ray's own messages through to the terminal.
        tracking: the MLflow run of the job (default: MLFLOW_TRACKING_URI or ./mlflow.db).
    """

    source: str
    model: str
    output: str
    tile: int | None = None
    overlap: int | None = None
    window: str = DEFAULT_WINDOW
    scores: str = "logits"
    scores_dtype: str = "float16"
    tta: bool = False
    uncertainty: bool = False
    batch_size: int = 8
    device: str = "auto"
    level: int | None = None
    chunk: int | None = None
    shard: int | None = None
    block: int = 2048
    workers: int | None = None
    threads: int | None = None
    address: str | None = None
    skip_background: bool = True
    pipelined: bool | None = None
    actors_per_gpu: int = 1
    compile: bool = False
    runtime: str | None = None
    overwrite: bool = False
    accept_input: bool = False
    progress: bool = True
    verbose: bool = False
    tracking: Tracking = field(default_factory=Tracking)

    def __post_init__(self) -> None:
        if self.window not in WINDOWS:
            raise ConfigError(f"window={self.window!r}: choose one of {', '.join(WINDOWS)}")
        if self.block <= 0:
            raise ConfigError(f"block {self.block} must be positive: e.g. block=2048")
        derived = self.shard is None and self.chunk is None
        if derived and self.block < MAX_SHARD and self.block & (self.block - 1):
            raise ConfigError(f"block {self.block} must be a power of two below {MAX_SHARD} (e.g. 512 or 1024) or a "
                              f"multiple of {MAX_SHARD}: a block is whole shards, and a shard halves down to one chunk")
        shard = min(self.block, MAX_SHARD) if self.shard is None else self.shard
        chunk = min(MAX_CHUNK, shard) if self.chunk is None else self.chunk
        object.__setattr__(self, "shard", shard)
        object.__setattr__(self, "chunk", chunk)
        from pipeline.models.runtimes import RUNTIMES
        from pipeline.mosaic import check_storage

        check_storage(chunk, shard)
        if self.block % shard:
            raise ConfigError(
                f"block {self.block} must be a multiple of shard {self.shard} (one writer per shard): "
                f"use block={self.shard} or a multiple of it"
            )
        for name in ("workers", "threads", "tile", "level", "actors_per_gpu"):
            value = getattr(self, name)
            if value is not None and value < (0 if name == "level" else 1):
                raise ConfigError(f"{name}={value} is out of range: use a positive number or leave it unset")
        if self.runtime is not None and self.runtime not in RUNTIMES:
            raise ConfigError(f"runtime={self.runtime!r} is unknown: use one of {', '.join(RUNTIMES)}, or leave it "
                              "unset to run the bundle on its own")
        self.inference  # noqa: B018  (validates scores, batch size and device before anything is written)

    @property
    def edges(self) -> tuple[int, int]:
        """The Zarr chunk and shard edges (derived from the block when not given)."""
        assert self.chunk is not None and self.shard is not None  # set in __post_init__
        return self.chunk, self.shard

    @property
    def inference(self) -> InferenceOptions:
        from pipeline.inference import InferenceOptions

        return InferenceOptions(device=self.device, batch_size=self.batch_size, tta=self.tta, scores=self.scores,
                                compile=self.compile, spread=self.uncertainty and self.tta)

    @property
    def layers(self) -> tuple[str, ...]:
        """The optional layers the mosaic gets (`MosaicLayout.layers`)."""
        return ("uncertainty", *(("spread",) if self.tta else ())) if self.uncertainty else ()


@dataclass(frozen=True)
class RefineConfig:
    """Settings of a refine job.

    Args:
        mosaic: the complete mosaic to refine (local folder).
        output: the refined mosaic to write.
        source: the image the mosaic was segmented from; None takes the path in its lineage.
        crf: the CRF's parameters.
        block: output block edge in px, a multiple of the input's shard; None means one shard.
        workers: parallel block tasks; None means one per core, as memory allows.
        address: the Ray cluster: None starts an embedded Ray; "auto" or "ray://host:10001" joins a cluster.
        overwrite: replace a complete mosaic at `output`, or start an unfinished one over.
        progress: show a progress bar of the blocks.
        verbose: let Ray's own messages through to the terminal.
        tracking: the MLflow run of the job (default: MLFLOW_TRACKING_URI or ./mlflow.db, experiment
            tessera-refine).
    """

    mosaic: str
    output: str
    source: str | None = None
    crf: CRFSettings = field(default_factory=CRFSettings)
    block: int | None = None
    workers: int | None = None
    address: str | None = None
    overwrite: bool = False
    progress: bool = True
    verbose: bool = False
    tracking: Tracking = field(default_factory=lambda: Tracking(experiment="tessera-refine"))

    def __post_init__(self) -> None:
        if self.workers is not None and self.workers < 1:
            raise ConfigError(f"workers={self.workers} is out of range: use a positive number or leave it unset")
