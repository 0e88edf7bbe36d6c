"""Engine overhead: ``Trainer``'s training loop against a bare PyTorch loop on the same model and batches.

The bare loop is forward, cross-entropy, backward, SGD step over the same ``TensorLoader``;
the engine adds the schedule, loss/accuracy bookkeeping, finiteness checks and weight-decay
groups. Epochs are timed round-robin (median), each starting from the same weights.

    python benchmarks/bench_engine.py            # writes results/engine.md
    python benchmarks/bench_engine.py --quick
"""

from __future__ import annotations

import argparse
import copy
import tempfile

import torch

from common import interleaved_median_times, markdown_table, write_results
from convzoo.data.sources import fake
from convzoo.train.config import TrainConfig
from convzoo.train.engine import DataBundle, Trainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    count = 1024 if args.quick else 2560  # 32x32 training images per epoch
    train_set, test_set = fake("train", image_size=32, size=count), fake("test", image_size=32, size=64)
    mean, std = train_set.channel_stats()
    config = TrainConfig(
        model="cifar_resnet20",
        data="fake",
        epochs=100,
        batch_size=128,
        progress=False,
        device="cpu",
        output=tempfile.mkdtemp() + "/run",
    )
    trainer = Trainer(config, data=DataBundle(train_set, test_set, mean, std, 10))
    initial = copy.deepcopy(trainer.core.state_dict())
    model = copy.deepcopy(trainer.core)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    criterion = torch.nn.CrossEntropyLoss()
    loader = trainer.train_loader

    def bare() -> None:
        model.load_state_dict(initial)
        model.train()
        for inputs, labels in loader:
            loss = criterion(model(inputs), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    def engine() -> None:
        trainer.core.load_state_dict(initial)
        trainer.running.zero_()
        trainer._train_epoch(0, 0)

    repeats = 3 if args.quick else 7
    times = interleaved_median_times({"bare loop": bare, "convzoo engine": engine}, warmup=1, repeats=repeats)
    images = len(loader) * loader.batch_size
    overhead = times["convzoo engine"] / times["bare loop"] - 1
    rows = [[name, f"{seconds:.2f}", f"{images / seconds:,.0f}"] for name, seconds in times.items()]
    table = markdown_table(["loop", "epoch (s)", "images/s"], rows)
    body = (
        f"cifar_resnet20, batch 128, {images:,} 32x32 images per epoch, CPU, {args.threads} thread(s), "
        f"median of {repeats} interleaved epochs.\n\n{table}\n\nEngine overhead: {100 * overhead:+.1f}% (target <= 5%)."
    )
    write_results("engine", "Training engine overhead against a bare loop", body)


if __name__ == "__main__":
    main()
