"""Small reference models for examples, tests and benchmarks (no torchvision needed)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Mnist1dCNN(nn.Module):
    """A 1D CNN for MNIST-1D: input (N, 1, 40), 10 classes; 31k weights at 64 channels."""

    def __init__(self, channels: int = 64, num_classes: int = 10):
        super().__init__()
        c = channels
        self.conv1 = nn.Conv1d(1, c, 5, padding=2)
        self.conv2 = nn.Conv1d(c, c, 3, padding=1, stride=2)
        self.conv3 = nn.Conv1d(c, c, 3, padding=1, stride=2)
        self.fc = nn.Linear(c * 10, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = F.relu(self.conv3(x))
        return self.fc(x.flatten(1))


def _shortcut(cin: int, cout: int, stride: int) -> nn.Sequential:
    """A ResNet block's residual path: identity, or a strided 1x1 conv and batch norm where the shape changes."""
    if stride == 1 and cin == cout:
        return nn.Sequential()
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convs with batch norm and a residual add."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = _shortcut(cin, cout, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """A CIFAR-size ResNet (3x3 stem, four stages, global pooling)."""

    def __init__(self, blocks=(2, 2, 2, 2), width: int = 64, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        layers, cin = [], width
        for i, n in enumerate(blocks):
            cout = width * 2**i
            stage = []
            for j in range(n):
                stage.append(BasicBlock(cin, cout, 2 if (j == 0 and i > 0) else 1))
                cin = cout
            layers.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


def resnet18(num_classes: int = 10, width: int = 64) -> ResNet:
    """ResNet-18 for 32x32 inputs (11M parameters at width 64)."""
    return ResNet((2, 2, 2, 2), width, num_classes)


class TransformerBlock(nn.Module):
    """A pre-norm transformer encoder block written with plain Linear layers."""

    def __init__(self, dim: int = 256, heads: int = 4, mlp_ratio: int = 4, dropout: float = 0.0):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, mlp_ratio * dim)
        self.fc2 = nn.Linear(mlp_ratio * dim, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v)
        x = x + self.drop(self.proj(a.transpose(1, 2).reshape(b, t, d)))
        return x + self.drop(self.fc2(F.gelu(self.fc1(self.norm2(x)))))


class Bottleneck(nn.Module):
    """ResNet bottleneck block: 1x1 reduce, 3x3, 1x1 expand (x4), batch norms and a residual add."""

    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1):
        super().__init__()
        cout = planes * self.expansion
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.shortcut = _shortcut(cin, cout, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(x))


class BottleneckResNet(nn.Module):
    """A small CIFAR-size ResNet of bottleneck blocks (3x3 stem, one block per stage by default)."""

    def __init__(self, blocks=(1, 1, 1), width: int = 16, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        stages, cin = [], width
        for i, n in enumerate(blocks):
            for j in range(n):
                stages.append(Bottleneck(cin, width * 2**i, 2 if (j == 0 and i > 0) else 1))
                cin = width * 2**i * Bottleneck.expansion
        self.blocks = nn.Sequential(*stages)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.blocks(F.relu(self.bn1(self.conv1(x))))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand, 3x3 depthwise, 1x1 linear projection; residual when shapes allow."""

    def __init__(self, cin: int, cout: int, stride: int = 1, expand: int = 6):
        super().__init__()
        hidden = cin * expand
        self.residual = stride == 1 and cin == cout
        self.expand = nn.Sequential(nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True))
        self.depthwise = nn.Sequential(nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
                                       nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True))
        self.project = nn.Sequential(nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.project(self.depthwise(self.expand(x)))
        return x + out if self.residual else out


class MobileNetV2(nn.Module):
    """A small MobileNetV2 for 32x32 inputs: stem, inverted residual blocks, 1x1 head, classifier."""

    def __init__(self, width: int = 16, num_classes: int = 10):
        super().__init__()
        c = width
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU6(inplace=True))
        self.blocks = nn.Sequential(
            InvertedResidual(c, c, 1, expand=1), InvertedResidual(c, 2 * c, 2), InvertedResidual(2 * c, 2 * c, 1),
            InvertedResidual(2 * c, 4 * c, 2), InvertedResidual(4 * c, 4 * c, 1),
        )
        self.head = nn.Sequential(nn.Conv2d(4 * c, 8 * c, 1, bias=False), nn.BatchNorm2d(8 * c), nn.ReLU6(inplace=True))
        self.fc = nn.Linear(8 * c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.head(self.blocks(self.stem(x)))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


class MLP(nn.Module):
    """A multilayer perceptron with ReLU between its Linear layers."""

    def __init__(self, sizes=(40, 256, 256, 10)):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        for layer in self.layers[:-1]:
            x = F.relu(layer(x))
        return self.layers[-1](x)


class Mnist1dNet(nn.Module):
    """A 1D CNN for MNIST-1D, conv-BN-ReLU as the paper's VGG and ResNets: 102k weights at width 64.

    Most weights sit in the hidden fully connected layer, where a weight costs
    one multiply-accumulate per sample, so the model is large enough to learn
    at 98% sparsity and still cheap to train on a CPU. Batch norm keeps the
    signal alive in a network that starts sparse.
    """

    def __init__(self, width: int = 64, hidden: int = 128, num_classes: int = 10):
        super().__init__()
        w = width
        self.conv1 = nn.Conv1d(1, w // 2, 5, padding=2, bias=False)
        self.bn1 = nn.BatchNorm1d(w // 2)
        self.conv2 = nn.Conv1d(w // 2, w, 3, padding=1, stride=2, bias=False)
        self.bn2 = nn.BatchNorm1d(w)
        self.conv3 = nn.Conv1d(w, w, 3, padding=1, stride=2, bias=False)
        self.bn3 = nn.BatchNorm1d(w)
        self.fc1 = nn.Linear(w * 10, hidden, bias=False)
        self.bn4 = nn.BatchNorm1d(hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = F.relu(self.bn3(self.conv3(x)))
        x = F.relu(self.bn4(self.fc1(x.flatten(1))))
        return self.fc2(x)
