"""No-compile route for mmcv's ops: when `mmcv._ext` is missing (mmcv-lite), provide the ops that Mask R-CNN and
UperNet need from torchvision.

Every `mmcv.ops` module looks its kernels up in the compiled module `mmcv._ext` when it is imported, so mmdet
and mmseg cannot even be imported with mmcv-lite. `install()` registers a stand-in `mmcv._ext` that implements

    nms                                  torchvision.ops.nms (offset 0 only, mmcv's default)
    roi_align_forward                    torchvision's roi_align kernel ('avg' pooling, mmcv's default)
    roi_align_backward                   torchvision's roi_align backward kernel ('avg' pooling)

These cover Mask R-CNN (RPN/RoI NMS, RoIAlign feature extraction for the box and mask heads, mask targets)
and UperNet (no compiled op at all). Every other kernel name resolves to a function that raises
`MissingOpError` naming the op when called, so importing works and using an uncovered op fails clearly.
"""
from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
import types
from typing import Any, Callable, Dict

import torch
from torch import Tensor

__all__ = ["COVERED_OPS", "MissingOpError", "install", "has_compiled_ops", "using_torchvision_ops"]

_NAME = "mmcv._ext"


class MissingOpError(RuntimeError):
    """An mmcv op that neither mmcv's compiled extension nor the torchvision route provides."""


def _nms(boxes: Tensor, scores: Tensor, iou_threshold: float, offset: int = 0) -> Tensor:
    # torchvision measures box sides as x2 - x1, which is mmcv's offset=0 convention
    if offset != 0:
        raise MissingOpError(f"mmcv op 'nms' with offset={offset} is not covered by the torchvision route "
                             f"(offset 0 only); build mmcv's ops with dense/build_mmcv.sh")
    import torchvision
    return torchvision.ops.nms(boxes, scores, float(iou_threshold))


def _check_avg(op: str, pool_mode: int) -> None:
    if pool_mode != 1:  # mmcv encodes 'max' as 0, 'avg' as 1
        raise MissingOpError(f"mmcv op '{op}' with pool_mode='max' is not covered by the torchvision route "
                             f"('avg' only); build mmcv's ops with dense/build_mmcv.sh")


def _roi_align_forward(input: Tensor, rois: Tensor, output: Tensor, argmax_y: Tensor, argmax_x: Tensor,
                       aligned_height: int, aligned_width: int, spatial_scale: float, sampling_ratio: int,
                       pool_mode: int, aligned: bool) -> None:
    # mmcv's kernels write into preallocated outputs; rois are (batch_index, x1, y1, x2, y2) in both libraries
    _check_avg("roi_align_forward", pool_mode)
    import torchvision  # noqa: F401  (registers torch.ops.torchvision)
    output.copy_(torch.ops.torchvision.roi_align(input, rois, float(spatial_scale), int(aligned_height),
                                                 int(aligned_width), int(sampling_ratio), bool(aligned)))


def _roi_align_backward(grad_output: Tensor, rois: Tensor, argmax_y: Tensor, argmax_x: Tensor, grad_input: Tensor,
                        aligned_height: int, aligned_width: int, spatial_scale: float, sampling_ratio: int,
                        pool_mode: int, aligned: bool) -> None:
    _check_avg("roi_align_backward", pool_mode)
    import torchvision  # noqa: F401
    batch, channels, height, width = grad_input.shape
    grad_input.copy_(torch.ops.torchvision._roi_align_backward(
        grad_output, rois, float(spatial_scale), int(aligned_height), int(aligned_width), batch, channels,
        height, width, int(sampling_ratio), bool(aligned)))


COVERED_OPS: Dict[str, Callable[..., Any]] = {
    "nms": _nms,
    "roi_align_forward": _roi_align_forward,
    "roi_align_backward": _roi_align_backward,
}


def _missing(name: str) -> Callable[..., Any]:
    def op(*args: Any, **kwargs: Any) -> Any:
        raise MissingOpError(
            f"mmcv op '{name}' needs mmcv's compiled extension (mmcv._ext), which is not installed; the "
            f"torchvision route covers only {', '.join(COVERED_OPS)}. Build mmcv with dense/build_mmcv.sh")
    op.__name__ = name
    return op


class _TorchvisionExt(types.ModuleType):
    """Stand-in for `mmcv._ext`: covered ops, and an erroring function for any other name."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return _missing(name)


def has_compiled_ops() -> bool:
    """True when mmcv's own compiled extension is importable (then `install` changes nothing)."""
    module = sys.modules.get(_NAME)
    if module is not None:
        return not isinstance(module, _TorchvisionExt)
    try:
        return importlib.util.find_spec(_NAME) is not None
    except ModuleNotFoundError:  # mmcv itself is not installed
        return False


def using_torchvision_ops() -> bool:
    """True when `mmcv._ext` is this module's torchvision stand-in."""
    return isinstance(sys.modules.get(_NAME), _TorchvisionExt)


def install() -> bool:
    """Register the torchvision stand-in as `mmcv._ext` unless mmcv's compiled ops exist; True if registered.

    Must run before the first successful `import mmcv.ops` (mmdet and mmseg import it); `import dense` does
    it. After an `import mmcv.ops` that failed on the missing `mmcv._ext` it still works: the failed modules
    are gone from sys.modules, so repeating that import runs them against the stand-in.
    """
    if using_torchvision_ops():
        return True
    if importlib.util.find_spec("mmcv") is None:
        raise ModuleNotFoundError("mmcv is not installed: pip install -r requirements-dense.txt")
    if has_compiled_ops():
        return False
    if "mmcv.ops" in sys.modules:
        raise RuntimeError("mmcv.ops was imported before dense.ops.install(); import dense first")
    module = _TorchvisionExt(_NAME, __doc__)
    module.__spec__ = importlib.machinery.ModuleSpec(_NAME, loader=None)  # find_spec() of it must not fail
    for name, fn in COVERED_OPS.items():
        setattr(module, name, fn)
    sys.modules[_NAME] = module
    import mmcv
    mmcv._ext = module  # type: ignore[attr-defined]
    return True
