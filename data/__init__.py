"""Data pipeline: ImageFolder datasets (ImageNet layout or the embedded MNIST-5k), timm transforms, loaders."""
from .build import DataError, Loaders, build_loaders, build_mixup, resolve_data_root, set_epoch
from .image_folder import CheckedImageFolder, CorruptImageError, corrupt_image_summary
from .mnist5k import MNIST5K_INSTALL_HINT, Mnist5kUnavailable, default_mnist5k_root, ensure_mnist5k
from .transforms import build_transform

__all__ = ["DataError", "Loaders", "build_loaders", "build_mixup", "resolve_data_root", "CheckedImageFolder",
           "CorruptImageError", "corrupt_image_summary", "MNIST5K_INSTALL_HINT", "Mnist5kUnavailable",
           "default_mnist5k_root", "ensure_mnist5k", "build_transform", "set_epoch"]
