"""Where to normalise on CPU: FFCV's NormalizeImage (before ToTensor) or torch after the loader.

Same data as benchmarks/data_loading.py (Fashion-MNIST train as 3x32x32 raw uint8), FFCV's own
flip + translate, batch 512, 2 threads, 3 epochs each (epoch 1 includes the JIT compile).

    uv run python benchmarks/normalize_placement.py
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from ffcv.fields.decoders import IntDecoder, NDArrayDecoder
from ffcv.loader import Loader, OrderOption
from ffcv.transforms import NormalizeImage, RandomHorizontalFlip, RandomTranslate, ToTensor, ToTorchImage

sys.path.insert(0, str(Path(__file__).parent))
from data_loading import INFO, rgb32, write_beton  # noqa: E402


def main() -> None:
    mean, std = np.array(INFO.mean) * 255, np.array(INFO.std) * 255
    m, s = (torch.tensor(v, dtype=torch.float32).view(1, 3, 1, 1) for v in (mean, std))
    with tempfile.TemporaryDirectory() as tmp:
        path = write_beton(rgb32(None), Path(tmp)).path("train")
        for in_ffcv in (True, False):
            image = [NDArrayDecoder(), RandomHorizontalFlip(), RandomTranslate(padding=4)]
            image += [NormalizeImage(mean, std, np.float32)] if in_ffcv else []
            image += [ToTensor(), ToTorchImage(channels_last=False)]
            loader = Loader(
                str(path),
                batch_size=512,
                num_workers=2,
                order=OrderOption.RANDOM,
                seed=0,
                pipelines={"image": image, "label": [IntDecoder(), ToTensor()]},
            )
            rates = []
            for _ in range(3):
                start, n = time.perf_counter(), 0
                for x, _ in loader:
                    if not in_ffcv:
                        x = (x.float() - m) / s
                    n += len(x)
                rates.append(n / (time.perf_counter() - start))
            where = "FFCV NormalizeImage" if in_ffcv else "torch after the loader"
            print(f"{where:24s} " + " ".join(f"{r:9.0f}" for r in rates) + " img/s", flush=True)


if __name__ == "__main__":
    main()
