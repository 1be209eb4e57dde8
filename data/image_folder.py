"""ImageFolder with an explicit policy for images that cannot be decoded.

Policy (DATA.SKIP_CORRUPT):
- False (default): the first unreadable image stops the run with `CorruptImageError` naming its path.
- True: every unreadable image is logged as a warning (path and reason) and replaced by the next image
  of the dataset, so batches keep their size; the warning repeats each time the file is drawn.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Optional, Tuple

from PIL import Image, UnidentifiedImageError
from torchvision.datasets import ImageFolder

__all__ = ["CorruptImageError", "CheckedImageFolder", "corrupt_image_summary"]

_logger = logging.getLogger("defmamba.data")

# Prefix that identifies the message even after DataLoader wraps it in a worker traceback.
_PREFIX = "unreadable image "


class CorruptImageError(RuntimeError):
    """An image file that PIL cannot decode; the message names the file.

    It takes a single message argument so DataLoader can re-raise it in the main process.
    """


def corrupt_image_summary(err: CorruptImageError) -> str:
    """The one-line message, also when `err` was re-raised from a DataLoader worker."""
    lines = [line for line in str(err).splitlines() if _PREFIX in line]
    return lines[-1][lines[-1].index(_PREFIX):] if lines else str(err).strip().splitlines()[-1]


def _load_rgb(path: str) -> Image.Image:
    with open(path, "rb") as f:
        image = Image.open(f)
        return image.convert("RGB")


class CheckedImageFolder(ImageFolder):
    """`torchvision.datasets.ImageFolder` that applies the corrupt-image policy above."""

    def __init__(self, root: str, transform: Optional[Callable] = None, skip_corrupt: bool = False) -> None:
        super().__init__(root, transform=transform, loader=_load_rgb)
        self.skip_corrupt = skip_corrupt

    def __getitem__(self, index: int) -> Tuple[Any, int]:
        # Try each image at most once so a dataset of only broken files still terminates.
        for offset in range(len(self.samples)):
            path, target = self.samples[(index + offset) % len(self.samples)]
            try:
                image = self.loader(path)
            except (OSError, UnidentifiedImageError, ValueError) as err:
                message = f"{_PREFIX}{path}: {err}"
                if not self.skip_corrupt:
                    raise CorruptImageError(message + " (set DATA.SKIP_CORRUPT True to skip such files)") from None
                _logger.warning("%s; skipped (DATA.SKIP_CORRUPT)", message)
                continue
            if self.transform is not None:
                image = self.transform(image)
            return image, target
        raise CorruptImageError(f"{_PREFIX}folder {self.root}: none of its {len(self.samples)} images can be decoded")
