"""Sample transforms: ``transform(sample) -> sample`` in DataLoader workers, and the usual chain for
spectrogram items (``SpectrogramTransform``: to dB, fixed frames, normalised)."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from . import store
from .errors import LmdbkitError
from .reader import Reader
from .stft import as_complex64, is_pairs


class LMDBDataTransform:
    """Base class of sample transforms: ``transform(sample) -> sample`` runs per item (in DataLoader workers,
    on the CPU); ``to_device(batch)`` moves a collated batch to ``target_device`` in the main process.

    Subclasses override ``transform``; ``Compose`` chains them.
    """

    def __init__(self, target_device: str | torch.device = "cpu"):
        self.target_device = torch.device(target_device)

    def __call__(self, sample: dict) -> dict:
        return self.transform(sample)

    def transform(self, sample: dict) -> dict:
        return sample

    def to_device(self, batch: Any) -> Any:
        return to_device(batch, self.target_device)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if k != "target_device")
        return f"{type(self).__name__}({args})"


def to_device(batch: Any, device: str | torch.device) -> Any:
    """Move every tensor in a (nested) batch to ``device``; non-blocking from pinned memory."""
    device = torch.device(device)
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=batch.is_pinned())
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


class Compose(LMDBDataTransform):
    """Apply transforms in order."""

    def __init__(self, transforms: Sequence[Callable[[dict], dict]], target_device: str | torch.device = "cpu"):
        super().__init__(target_device)
        self.transforms = list(transforms)

    def transform(self, sample: dict) -> dict:
        for t in self.transforms:
            sample = t(sample)
        return sample


SPEC_OUTPUTS = ("db", "magnitude", "power")
STORED = ("complex", "magnitude", "power", "db", "mel", "log_mel", "mfcc")


class ToSpectrogram(LMDBDataTransform):
    """A stored spectrogram field as a float32 ``output`` spectrogram ("db", "magnitude" or "power"), with a
    channel axis: [C, rows, frames]. ``stored`` is the database's StftConfig output: a complex STFT (also
    complex32, or its float16 pairs), magnitude, power or db, or mel bands (mel, log_mel: their power or
    dB); MFCCs are passed through as float32."""

    def __init__(self, output: str = "db", *, field: str = "stft", stored: str = "complex", db_floor: float = 1e-10,
                 target_device: str | torch.device = "cpu"):
        super().__init__(target_device)
        if output not in SPEC_OUTPUTS:
            raise LmdbkitError(f"output={output!r} is unsupported. Supported outputs are {list(SPEC_OUTPUTS)}")
        self.output, self.field, self.stored, self.db_floor = output, field, stored, db_floor

    def transform(self, sample: dict) -> dict:
        x = torch.as_tensor(sample[self.field])
        if torch.is_complex(x) or (self.stored == "complex" and is_pairs(x)):
            z = as_complex64(x)  # complex64/128, complex32, or complex32 read as its float16 pairs
            power = z.real.square().add_(z.imag.square())
        elif self.stored == "magnitude":
            power = x.float().square()
        elif self.stored in ("power", "mel"):
            power = x.float()
        elif self.stored in ("db", "log_mel"):
            power = None
        elif self.stored == "mfcc":
            y = x.float()
            return dict(sample, **{self.field: y.unsqueeze(0) if y.dim() == 2 else y})
        else:
            raise LmdbkitError(f"stored={self.stored!r}: a real spectrogram field must say how it was stored "
                               f"({list(STORED)}); see the database's metadata['stft']['output']")
        if power is None:  # stored in dB: converted only when another output is asked for
            y = x.float() if self.output == "db" else torch.pow(10.0, x.float() / 10)
            if self.output == "magnitude":
                y = y.sqrt()
        elif self.output == "power":
            y = power
        elif self.output == "magnitude":
            y = power.sqrt()
        else:
            y = power.clamp_min(self.db_floor).log10_().mul_(10.0)  # (in place on clamp_min's new tensor)
        if y.dim() == 2:
            y = y.unsqueeze(0)
        return dict(sample, **{self.field: y})


CROPS = ("random", "center", "start")


class FixFrames(LMDBDataTransform):
    """Crop or zero-pad the last (time) axis of ``field`` to ``frames``; records the valid length in ``length``.

    crop: "random" (training; uses torch's RNG, which DataLoader seeds per worker), "center" or "start".
    """

    def __init__(self, frames: int, *, crop: str = "random", field: str = "stft",
                 target_device: str | torch.device = "cpu"):
        super().__init__(target_device)
        if not isinstance(frames, int) or frames < 1:
            raise LmdbkitError(f"frames={frames!r}: give a positive number of frames")
        if crop not in CROPS:
            raise LmdbkitError(f"crop={crop!r} is unsupported. Supported crops are {list(CROPS)}")
        self.frames, self.crop, self.field = frames, crop, field

    def transform(self, sample: dict) -> dict:
        x = sample[self.field]
        t = x.shape[-1]
        if t > self.frames:
            if self.crop == "random":
                start = int(torch.randint(0, t - self.frames + 1, ()).item())
            elif self.crop == "center":
                start = (t - self.frames) // 2
            else:
                start = 0
            x = x[..., start:start + self.frames]
        elif t < self.frames:
            x = torch.nn.functional.pad(x, (0, self.frames - t))
        return dict(sample, **{self.field: x.contiguous(), "length": min(t, self.frames)})


class _CropFirst(FixFrames):
    """FixFrames's crop of a longer item, before the conversion (complex32 read as float16 pairs, whose last
    axis is not time, is cropped after it, by the FixFrames that follows)."""

    def transform(self, sample: dict) -> dict:
        x = sample[self.field]
        return sample if is_pairs(x) or x.shape[-1] <= self.frames else super().transform(sample)


class Normalize(LMDBDataTransform):
    """Per-item standardisation (``mean=None``) or fixed ``(x - mean) / std``."""

    def __init__(self, mean: float | None = None, std: float | None = None, *, field: str = "stft", eps: float = 1e-5,
                 target_device: str | torch.device = "cpu"):
        super().__init__(target_device)
        self.mean, self.std, self.field, self.eps = mean, std, field, eps

    def transform(self, sample: dict) -> dict:
        x = sample[self.field]
        if self.mean is None:
            y = (x - x.mean()).div_(x.std() + self.eps)
        else:
            y = (x - self.mean).div_(self.std or 1.0)
        return dict(sample, **{self.field: y})


class SpectrogramTransform(Compose):
    """The usual chain for STFT items: to dB (or magnitude/power), fixed frames, normalised.

    A longer item is cropped before it is converted (the conversion is per element: the same values, for the
    frames kept only), a shorter one padded after (a padded frame is 0 in the output). 257 x 128 complex64
    items to 64 frames: 154 -> 138 µs an item in one thread; a 2-worker DataLoader 4.1-4.8k -> 5.1-5.7k items/s.
    ``SpectrogramTransform.for_database(path, frames=64, train=True)`` reads how the items were stored.
    """

    def __init__(self, *, frames: int | None = 64, output: str = "db", stored: str = "complex", crop: str = "random",
                 normalize: bool = True, field: str = "stft", target_device: str | torch.device = "cpu"):
        parts: list = [ToSpectrogram(output, field=field, stored=stored)]
        if frames is not None:
            parts.insert(0, _CropFirst(frames, crop=crop, field=field))
            parts.append(FixFrames(frames, crop=crop, field=field))  # pads (and records the length)
        if normalize:
            parts.append(Normalize(field=field))
        super().__init__(parts, target_device)

    @classmethod
    def for_database(cls, path, *, train: bool, **kw) -> "SpectrogramTransform":
        with Reader(store.resolve_paths(path)[0]) as r:  # a database, list, folder or glob
            stored = r.metadata.get("stft", {}).get("output", "complex")
        return cls(stored=stored, crop="random" if train else "center", **kw)
