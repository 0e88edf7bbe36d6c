"""Augmented CIFAR batches per second: convzoo's in-memory tensor path against torchvision per-sample transforms.

Both produce the same thing, normalized float batches with pad-4 random crop and flip, from
the same uint8 images in memory: convzoo's ``TensorLoader`` (one gather + one fused
normalize per batch) and a ``DataLoader`` over torchvision v2 transforms applied per image
(the usual reference pipeline, no worker processes). Also reports the one-off decode of the
JPEG copy of CIFAR-10 against reading the safetensors cache.

    python benchmarks/bench_data.py            # writes results/data.md
    python benchmarks/bench_data.py --quick
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from common import interleaved_median_times, markdown_table, write_results
from convzoo.data import BatchAugment, ImageSet, TensorLoader, load_imageset

CIFAR_JPEG = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg"


class PerSample(Dataset):
    """(C, H, W) uint8 images through torchvision v2 transforms, one at a time."""

    def __init__(self, data: ImageSet, mean: list[float], std: list[float]) -> None:
        self.data = data
        self.transform = v2.Compose(
            [
                v2.RandomCrop(data.image_shape[1], padding=4),
                v2.RandomHorizontalFlip(),
                v2.ToDtype(torch.float32, scale=False),
                v2.Normalize(mean, std),
            ]
        )

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.data.images[index]), int(self.data.labels[index])


def consume(loader: object, batches: int) -> None:
    for index, _batch in enumerate(loader):
        if index + 1 == batches:
            break


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lines = []
    if CIFAR_JPEG.is_dir():
        cache = Path(tempfile.mkdtemp(prefix="convzoo-bench-cache-"))
        start = time.perf_counter()
        data = load_imageset("cifar10", "train", data_dir=CIFAR_JPEG, cache_dir=cache)
        decode = time.perf_counter() - start
        start = time.perf_counter()
        load_imageset("cifar10", "train", data_dir=CIFAR_JPEG, cache_dir=cache)
        cached = time.perf_counter() - start
        lines.append(
            f"CIFAR-10 JPEG training set ({len(data):,} images): first decode {decode:.1f} s, "
            f"from the safetensors cache {cached:.2f} s."
        )
    else:
        generator = torch.Generator().manual_seed(0)
        data = ImageSet(
            torch.randint(0, 256, (50_000, 3, 32, 32), dtype=torch.uint8, generator=generator),
            torch.arange(50_000) % 10,
            [str(c) for c in range(10)],
        )
        lines.append("../shared/data/cifar10-jpeg not found: random uint8 images of CIFAR's shape.")
    mean, std = data.channel_stats()
    batch_sizes = (128,) if args.quick else (128, 256)
    repeats = 3 if args.quick else 7
    rows = []
    for batch_size in batch_sizes:
        batches = 40 if args.quick else 100
        tensor_loader = TensorLoader(data, batch_size, BatchAugment(mean, std, "crop_flip"), seed=0)
        reference = DataLoader(
            PerSample(data, mean, std), batch_size=batch_size, shuffle=True, num_workers=0, drop_last=True
        )
        reference_batches = max(4, batches // 10)
        times = interleaved_median_times(
            {
                "convzoo": lambda tl=tensor_loader, n=batches: consume(tl, n),
                "torchvision": lambda rl=reference, n=reference_batches: consume(rl, n),
            },
            warmup=1,
            repeats=repeats,
        )
        ours = batches * batch_size / times["convzoo"]
        theirs = reference_batches * batch_size / times["torchvision"]
        rows.append(
            [batch_size, f"{ours:,.0f}", f"{theirs:,.0f}", f"{ours / theirs:.1f}x", "yes" if ours >= 20_000 else "no"]
        )
    table = markdown_table(
        [
            "batch",
            "convzoo TensorLoader (images/s)",
            "torchvision v2 per sample (images/s)",
            "speed-up",
            ">= 20k images/s",
        ],
        rows,
    )
    body = (
        "\n".join(lines) + "\n\nAugmented (pad-4 crop + flip + normalize) float batches on the CPU, "
        f"{args.threads} thread(s), "
        f"median of {repeats} interleaved runs.\n\n" + table
    )
    write_results("data", "Data pipeline: augmented CIFAR images per second", body)


if __name__ == "__main__":
    main()
