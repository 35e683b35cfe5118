"""Vision tasks on real data with no download: the 1797 8x8 handwritten digits scikit-learn ships
(``sklearn.datasets.load_digits``; Optical Recognition of Handwritten Digits, UCI, Alpaydin and Kaynak, 1998).

``digits``: classification. inputs (B, 1, 8, 8) float in [0, 1], targets (B, 1) long, the digit.
``digits_seg``: segmentation of the strokes by digit. inputs (B, 1, S, S) with S = 8 * upsample (bilinear),
targets (B, S * S) long per pixel: 0 = background, 1 + digit where the upsampled ink exceeds ``threshold``;
the classes of the strokes need the whole image, the mask its pixels. Reported: pixel accuracy and the
Dice score averaged over the ten digit classes (``dice``).

Models keep the lab's interface: ``model(inputs)[0]`` is (B, T, classes) logits scored by cross-entropy at
labelled positions (T = 1 for classification, S * S for segmentation), so the one trainer trains them.
The split is fixed by ``split_seed`` (a permutation of the 1797 images, the first ``val_fraction`` held out);
training batches are drawn with replacement from the training images, evaluation walks the held-out ones
in order.
"""

from __future__ import annotations

import functools
import hashlib

import torch
import torch.nn.functional as F

from ._base import Task


@functools.cache
def load_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """(1797, 8, 8) float in [0, 1] and (1797,) long labels, from scikit-learn's bundled copy."""
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError as error:
        raise ImportError(
            "the digits tasks need scikit-learn (it ships the data): pip install 'gatelab[vision]'"
        ) from error
    data = sklearn_digits()
    images = torch.tensor(data.images, dtype=torch.float32) / 16.0  # pixel values are 0..16
    return images, torch.tensor(data.target, dtype=torch.long)


class DigitsTask(Task):
    name = "digits"
    n_digits = 10
    segment = False  # one label per image (the vision backbone's classification head)

    def __init__(self, val_fraction: float = 0.2, split_seed: int = 0):
        super().__init__(val_fraction=val_fraction, split_seed=split_seed)
        self.setup(val_fraction, split_seed)

    def setup(self, val_fraction: float, split_seed: int) -> None:
        """Check the split options, load the images and split them."""
        if (
            not isinstance(val_fraction, int | float)
            or isinstance(val_fraction, bool)
            or not 0 < val_fraction < 1
        ):
            raise ValueError(f"{self.name}: val_fraction must be in (0, 1), got {val_fraction!r}")
        if not isinstance(split_seed, int) or isinstance(split_seed, bool) or split_seed < 0:
            raise ValueError(f"{self.name}: split_seed must be an int >= 0, got {split_seed!r}")
        images, labels = load_digits()
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(split_seed))
        n_val = round(len(labels) * val_fraction)
        self.split = {"val": order[:n_val], "train": order[n_val:]}
        self.images, self.labels = self.prepare(images, labels)
        self.image_size = self.images.shape[-1]
        self.vocab_size = self.n_classes
        self.seq_len = self.targets_per_image

    n_classes = n_digits
    targets_per_image = 1

    def prepare(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, 8, 8), (N,) -> inputs (N, 1, S, S), targets (N, T)."""
        return images[:, None], labels[:, None]

    def describe(self) -> dict:
        digest = hashlib.sha256(self.images.numpy().tobytes() + self.labels.numpy().tobytes()).hexdigest()
        return {
            **super().describe(),
            "source": "sklearn.datasets.load_digits",
            "image_size": self.image_size,
            "n_train": len(self.split["train"]),
            "n_val": len(self.split["val"]),
            "sha256": digest,
        }

    def get_batch(self, split: str, batch_size: int, generator: torch.Generator):
        """-> inputs (B, 1, S, S) float, targets (B, T) long: images drawn with replacement from ``split``."""
        self.check_split(split, batch_size)
        index = self.split[split]
        pick = index[torch.randint(len(index), (batch_size,), generator=generator)]
        return self.images[pick], self.labels[pick]

    def eval_batches(self, n: int, batch_size: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The held-out images in their fixed order, ``n`` batches of ``batch_size`` at most (``seed`` is
        not needed: the split is fixed); n * batch_size >= n_val covers all of them."""
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive int, got {n!r}")
        self.check_split("val", batch_size)
        index = self.split["val"][: n * batch_size]
        return [(self.images[i], self.labels[i]) for i in index.split(batch_size)]


class DigitsSegmentationTask(DigitsTask):
    name = "digits_seg"
    segment = True  # a label per pixel (the U-Net)
    n_classes = DigitsTask.n_digits + 1  # background + ten digits

    def __init__(
        self, val_fraction: float = 0.2, split_seed: int = 0, upsample: int = 2, threshold: float = 0.5
    ):
        if not isinstance(upsample, int) or isinstance(upsample, bool) or upsample < 1:
            raise ValueError(f"digits_seg: upsample must be a positive int, got {upsample!r}")
        if not isinstance(threshold, int | float) or isinstance(threshold, bool) or not 0 < threshold < 1:
            raise ValueError(f"digits_seg: threshold must be in (0, 1), got {threshold!r}")
        self.upsample, self.threshold = upsample, threshold
        self.targets_per_image = (8 * upsample) ** 2
        Task.__init__(
            self, val_fraction=val_fraction, split_seed=split_seed, upsample=upsample, threshold=threshold
        )
        self.setup(val_fraction, split_seed)

    def prepare(self, images, labels):
        size = 8 * self.upsample
        up = F.interpolate(images[:, None], size=(size, size), mode="bilinear", align_corners=False)
        up = up.clamp(0, 1)  # (N, 1, S, S)
        ink = up[:, 0] > self.threshold  # (N, S, S)
        targets = torch.where(ink, labels[:, None, None] + 1, 0)  # 0 background, 1 + digit on the strokes
        return up, targets.flatten(1)  # (N, 1, S, S), (N, S * S)

    @torch.no_grad()
    def evaluate(self, model, n_batches: int = 8, batch_size: int = 32, seed: int = 0) -> dict:
        """Loss and pixel accuracy (as every task), and ``dice``: 2|P & T| / (|P| + |T|) per digit class
        over all evaluated pixels, averaged over the classes present in prediction or truth."""
        metrics = super().evaluate(model, n_batches, batch_size, seed)
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        inter = torch.zeros(self.n_classes, dtype=torch.float64)
        total = torch.zeros(self.n_classes, dtype=torch.float64)
        for inputs, targets in self.eval_batches(n_batches, batch_size, seed):
            pred = model(inputs.to(device))[0].argmax(dim=-1).cpu()  # (B, T)
            classes = torch.arange(self.n_classes)[:, None, None]
            p, t = pred[None] == classes, targets[None] == classes  # (C, B, T)
            inter += (p & t).flatten(1).sum(1).double()
            total += (p.flatten(1).sum(1) + t.flatten(1).sum(1)).double()
        model.train(was_training)
        present = total[1:] > 0
        metrics["dice"] = (
            float((2 * inter[1:][present] / total[1:][present]).mean()) if present.any() else 0.0
        )
        return metrics
