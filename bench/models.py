"""The model zoo, and the runtimes a model can run on.

    python -m bench.models [--repeats 5] [--threads 2]
    python -m bench.models --runtimes [--repeats 5]

Without --runtimes: parameters and CPU forward time of every registered architecture on a 512 x 512 tile.

Each architecture is built from scratch with tessera's defaults (3 bands, 5 classes), in eval mode;
the time is the median of `--repeats` forward passes of one 512 x 512 tile after one warm-up, with
`--threads` torch threads. The output stride is measured: the coarsest feature map a 3x3 or larger
convolution produces, relative to the input (SETR's is its patch: its 16x16 patch embedding).
Results go to bench/results/models.json; the rows printed are docs/models.md's table columns.

With --runtimes: PyTorch (eager, float32) against onnxruntime (CPU provider, the model exported as tessera
exports bundles) on the same batch of 8 tiles of 512 x 512 (the segment job's default batch and the demo's
tile), for the demo's U-Net and two other registry architectures, at 1 thread (a segment worker's share of
a 2-core machine) and at 2. The time is the median of `--repeats` batches after one warm-up; the largest
difference between the two runtimes' logits is reported beside. Results go to bench/results/runtimes.json.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bench.common import SMALL_UNET, save
from pipeline.models import available_architectures, build_model
from pipeline.models.runtimes import load_program, to_program

TILE = 512
BATCH = 8
RUNTIME_ARCHITECTURES = {  # the demo's model, and two of the registry's other families
    "unet": dict(SMALL_UNET),
    "deeplabv3plus": {},
    "segformer": {},
}


def output_stride(model: torch.nn.Module) -> int:
    """Input size over the smallest feature map a 3x3 (or larger) convolution produces, on a 512 px
    input: the encoder's deepest stride (1x1 convolutions after global or pyramid pooling, as in
    ASPP, PSP and U-Net 3+'s classification head, are left out)."""
    smallest = [TILE]

    def record(_module: torch.nn.Module, _inputs: object, output: object) -> None:
        outputs = output if isinstance(output, tuple) else (output,)
        for out in outputs:
            if isinstance(out, torch.Tensor) and out.dim() == 4:
                smallest[0] = min(smallest[0], out.shape[-1])

    hooks = [m.register_forward_hook(record) for m in model.modules()
             if isinstance(m, torch.nn.Conv2d | torch.nn.ConvTranspose2d) and max(m.kernel_size) >= 3]
    with torch.no_grad():
        model(torch.rand(1, 3, TILE, TILE))
    for hook in hooks:
        hook.remove()
    return TILE // smallest[0]


def median_time(model: torch.nn.Module, x: torch.Tensor, repeats: int) -> tuple[float, torch.Tensor]:
    """The median seconds of `repeats` forward passes after one warm-up, and the last output (float32)."""
    times = []
    with torch.no_grad():
        y = model(x)
        for _ in range(repeats):
            if x.is_cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            y = model(x)
            if x.is_cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    return statistics.median(times), y.float()


class Bf16ChannelsLast(torch.nn.Module):
    """The model as tessera runs it on a GPU: bf16 autocast on channels_last tensors."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return self.model(x.contiguous(memory_format=torch.channels_last))  # type: ignore[no-any-return]


def compare_runtimes(repeats: int, device: str) -> None:
    """torch against onnxruntime on the same tiles and threads (on a GPU: bf16 + channels_last against
    onnxruntime's CUDA provider)."""
    rows = []
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(BATCH, 3, TILE, TILE, generator=generator).to(device)
    for name, arch_args in RUNTIME_ARCHITECTURES.items():
        torch.manual_seed(0)
        model = build_model(name, in_channels=3, classes=5, **arch_args).eval()
        program, _ = to_program(model, "onnx", x[:2].cpu())  # a batch of 2, as export traces bundles
        model = model.to(device)
        fast = Bf16ChannelsLast(model) if device == "cuda" else model
        for threads in (1, 2) if device == "cpu" else (torch.get_num_threads(),):
            torch.set_num_threads(threads)
            onnx = load_program("onnx", program, device)  # its session takes torch's thread count
            torch_s, torch_y = median_time(fast, x, repeats)
            onnx_s, onnx_y = median_time(onnx, x, repeats)
            row = {"architecture": name, "device": device, "threads": threads, "batch": BATCH, "tile": TILE,
                   "torch": "bf16 channels_last" if device == "cuda" else "float32 eager",
                   "onnxruntime_providers": onnx.session.get_providers()[0],  # type: ignore[union-attr]
                   "torch_tiles_per_s": round(BATCH / torch_s, 2), "onnxruntime_tiles_per_s": round(BATCH / onnx_s, 2),
                   "onnxruntime_speedup": round(torch_s / onnx_s, 2),
                   "max_abs_logit_difference": float((torch_y - onnx_y).abs().max())}
            rows.append(row)
            print(f"| {name} | {device} | {threads} | {row['torch_tiles_per_s']:.2f} | "
                  f"{row['onnxruntime_tiles_per_s']:.2f} | {row['onnxruntime_speedup']:.2f}x | "
                  f"{row['max_abs_logit_difference']:.1e} |", flush=True)
    save("runtimes" if device == "cpu" else f"runtimes_{device}", rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5, help="runs of each measurement (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=2, help="default: %(default)s")
    parser.add_argument("--runtimes", action="store_true", help="torch against onnxruntime (see above)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="with --runtimes")
    args = parser.parse_args()
    if args.runtimes:
        compare_runtimes(args.repeats, args.device)
        return
    torch.set_num_threads(args.threads)
    rows = []
    x = torch.rand(1, 3, TILE, TILE)
    for name in available_architectures():
        torch.manual_seed(0)
        model = build_model(name, in_channels=3, classes=5).eval()
        params = sum(p.numel() for p in model.parameters())
        times = []
        with torch.no_grad():
            model(x)
            for _ in range(args.repeats):
                start = time.perf_counter()
                model(x)
                times.append(time.perf_counter() - start)
        row = {"architecture": name, "params": params, "forward_s": round(statistics.median(times), 3),
               "output_stride": output_stride(model), "threads": args.threads}
        rows.append(row)
        print(f"| {name} | {params / 1e6:.2f} M | {row['forward_s']:.2f} s | {row['output_stride']} |", flush=True)
    save("models", rows)


if __name__ == "__main__":
    main()
