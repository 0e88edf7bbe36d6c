"""``convzoo demo``: convert a small model to DO-Conv, train briefly on digits, deploy, check outputs.

(Interim main job of the foundation issue; the training CLI replaces it with a short ``compare``.)
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("demo", help="the README's main job on the embedded digits data")
    parser.add_argument("--steps", type=int, default=60, help="training steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(run=run)


def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (N, 1, 8, 8)
    images = F.interpolate(images, size=32, mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    return (images - 0.5) / 0.5, torch.tensor(data.target)


def run(args: argparse.Namespace) -> int:
    import convzoo

    torch.manual_seed(args.seed)
    images, labels = _digits()
    train_x, train_y, test_x, test_y = images[:1500], labels[:1500], images[1500:], labels[1500:]
    model = convzoo.create_model("cifar_resnet20", conv="doconv")
    report = convzoo.conversion_report(model)
    print(f"cifar_resnet20 with DO-Conv: {len(report.replaced)} convs replaced, {len(report.skipped)} skipped")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    model.train()
    for step in range(args.steps):
        index = torch.randint(0, len(train_x), (64,))
        loss = F.cross_entropy(model(train_x[index]), train_y[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 20 == 0 or step == args.steps - 1:
            print(f"step {step:3d}  loss {loss.item():.3f}")
    model.eval()
    deployed = convzoo.deploy(model)
    with torch.no_grad():
        reference, folded = model(test_x), deployed(test_x)
    accuracy = (folded.argmax(1) == test_y).float().mean().item()
    error = (reference - folded).abs().max().item()
    print(f"test accuracy {accuracy:.3f}; deployed vs training form max |diff| = {error:.2e}")
    params = (convzoo.profile.count_parameters(model), convzoo.profile.count_parameters(deployed))
    print(f"parameters: training form {params[0]:,}, deployed {params[1]:,}")
    torch.testing.assert_close(folded, reference, rtol=1e-4, atol=1e-4)
    print("deployed outputs match")
    return 0
