"""The model zoo: parameters and CPU forward time of every registered architecture on a 512 x 512 tile.

    python -m bench.models [--repeats 5] [--threads 2]

Each architecture is built from scratch with tessera's defaults (3 bands, 5 classes), in eval mode;
the time is the median of `--repeats` forward passes of one 512 x 512 tile after one warm-up, with
`--threads` torch threads. The output stride is measured: the coarsest feature map a 3x3 or larger
convolution produces, relative to the input (SETR's is its patch: its 16x16 patch embedding).
Results go to bench/results/models.json; the rows printed are docs/models.md's table columns.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bench.common import save
from pipeline.models import available_architectures, build_model

TILE = 512


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
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
