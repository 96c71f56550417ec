"""PyTorch side of benchmark P7: ResNet-20 training images/s on CPU.

The model is the one burn-coop trains (burn_coop_vision::models::CifarResNet, depth 20):
3x3 convolutions without bias, BatchNorm, option-A shortcuts (stride-2 subsampling and zero
channels appended), global average pooling, a linear classifier: 269,722 trainable parameters.
The step is the same: cross-entropy, SGD with Nesterov momentum 0.9, dampening 0, weight decay
5e-4, random normal images and fixed labels; the clock stops after reading the loss.

Usage: python resnet20_train.py --batch 32 --steps 10 --warmup 3 --threads 2
Prints one JSON line: {"images_per_second": ..., "params": ..., "torch": ..., "threads": ...}.
"""

import argparse
import json
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.stride = stride
        self.pad = cout - cin

    def forward(self, x):
        shortcut = x[:, :, :: self.stride, :: self.stride] if self.stride > 1 else x
        if self.pad > 0:
            shortcut = F.pad(shortcut, (0, 0, 0, 0, 0, self.pad))
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + shortcut)


class ResNet20(nn.Module):
    def __init__(self, classes=10, n=3):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        blocks, cin = [], 16
        for cout, stride in ((16, 1), (32, 2), (64, 2)):
            for k in range(n):
                blocks.append(Block(cin, cout, stride if k == 0 else 1))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(64, classes)

    def forward(self, x):
        x = F.relu(self.bn(self.conv(x)))
        x = self.blocks(x)
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = ResNet20()
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    optim = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, dampening=0, nesterov=True, weight_decay=5e-4)
    labels = torch.arange(args.batch) * 7 % 10
    times = []
    for step in range(args.warmup + args.steps):
        images = torch.randn(args.batch, 3, 32, 32)
        start = time.perf_counter()
        loss = F.cross_entropy(model(images), labels)
        optim.zero_grad(set_to_none=True)
        loss.backward()
        optim.step()
        loss.item()
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    print(json.dumps({
        "images_per_second": args.batch / statistics.median(times),
        "params": params,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }))


if __name__ == "__main__":
    main()
