"""uint8 batches -> the model's input: replicate a grayscale channel, pad, normalise.

Both loaders hand over uint8 [B, C, H, W] (on the training device for FFCV's GPU pipeline) and this
one step finishes the batch wherever it lies. FFCV's own NormalizeImage is not used: its CPU kernel
is written for 3 channels only, its GPU kernel needs CuPy and has no bf16, and on CPU the torch
normalisation measured faster (benchmarks/normalize_placement.py, docs/results.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from distswitch.data.datasets import DatasetInfo

# train.precision -> the autocast dtype (None: fp32, no autocast); the loaders normalise to it too.
AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class InputTransform:
    def __init__(
        self,
        source: DatasetInfo,
        target: DatasetInfo,
        dtype: torch.dtype = torch.float32,
        memory_format: torch.memory_format = torch.contiguous_format,
    ) -> None:
        self.source, self.target, self.dtype, self.memory_format = source, target, dtype, memory_format
        self._stats: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        # Crop-based sources (imagefolder) are already decoded at the target size.
        self.pad = 0 if source.augment == "resized_crop" else target.image_size - source.image_size
        if self.pad < 0:
            raise ValueError(f"cannot shrink {source.image_size}px images to {target.image_size}px by padding")

    def _mean_std(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._stats:
            mean = torch.tensor(self.target.mean, dtype=torch.float32, device=device).view(1, -1, 1, 1) * 255
            std = torch.tensor(self.target.std, dtype=torch.float32, device=device).view(1, -1, 1, 1) * 255
            self._stats[device] = (mean, std)
        return self._stats[device]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.pad:
            top = self.pad // 2
            x = F.pad(x, (top, self.pad - top, top, self.pad - top))  # black border, image centred
        if x.shape[1] != self.target.channels:
            x = x.expand(-1, self.target.channels, -1, -1)
        mean, std = self._mean_std(x.device)
        # Padding and channel expansion do not keep FFCV's NHWC layout: restore the configured one.
        return ((x.float() - mean) / std).to(self.dtype).contiguous(memory_format=self.memory_format)
