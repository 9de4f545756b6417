"""Let `import torchvision` (and so timm and segmentation_models_pytorch) work with a CPU torch.

The package registry here serves a CUDA build of torchvision 0.28.0. Its C++ extension cannot load
next to the CPU build of torch, and torchvision then fails at import time with
`RuntimeError: operator torchvision::nms does not exist`: its Python side registers fake/meta kernels
for operators that only the extension defines.

`ensure_torchvision_importable()` tries to load the extension exactly as torchvision would. If that
works (any matching install, e.g. a CUDA machine) it does nothing else. If it fails, it defines the
operator *schemas* (no kernels) so the Python side imports. torchvision's C++ ops (nms, roi_align,
deform_conv2d, ...) stay unavailable: calling one raises, and nothing in this project calls them.

Import this module before timm or segmentation_models_pytorch; importing it is enough.
"""
import glob
import importlib.util
import os

import torch

# Schemas of the operators torchvision's Python side refers to at import time, as its C++ code
# defines them. Only the names and argument lists matter: there are no kernels behind them.
_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "roi_align(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, SymInt pooled_width, "
    "int sampling_ratio, bool aligned) -> Tensor",
    "_roi_align_backward(Tensor grad, Tensor rois, float spatial_scale, SymInt pooled_height, "
    "SymInt pooled_width, SymInt batch_size, SymInt channels, SymInt height, SymInt width, "
    "int sampling_ratio, bool aligned) -> Tensor",
    "ps_roi_align(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, "
    "SymInt pooled_width, int sampling_ratio) -> (Tensor, Tensor)",
    "_ps_roi_align_backward(Tensor grad, Tensor rois, Tensor channel_mapping, float spatial_scale, "
    "SymInt pooled_height, SymInt pooled_width, int sampling_ratio, SymInt batch_size, SymInt channels, "
    "SymInt height, SymInt width) -> Tensor",
    "roi_pool(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, "
    "SymInt pooled_width) -> (Tensor, Tensor)",
    "_roi_pool_backward(Tensor grad, Tensor rois, Tensor argmax, float spatial_scale, SymInt pooled_height, "
    "SymInt pooled_width, SymInt batch_size, SymInt channels, SymInt height, SymInt width) -> Tensor",
    "ps_roi_pool(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, "
    "SymInt pooled_width) -> (Tensor, Tensor)",
    "_ps_roi_pool_backward(Tensor grad, Tensor rois, Tensor channel_mapping, float spatial_scale, "
    "SymInt pooled_height, SymInt pooled_width, SymInt batch_size, SymInt channels, SymInt height, "
    "SymInt width) -> Tensor",
    "qroi_align(Tensor input, Tensor rois, float input_scale, int input_zero_point, float rois_scale, "
    "int rois_zero_point, float spatial_scale, SymInt pooled_height, SymInt pooled_width, "
    "int sampling_ratio, bool aligned) -> Tensor",
    "deform_conv2d(Tensor input, Tensor weight, Tensor offset, Tensor mask, Tensor bias, SymInt stride_h, "
    "SymInt stride_w, SymInt pad_h, SymInt pad_w, SymInt dilation_h, SymInt dilation_w, SymInt groups, "
    "SymInt offset_groups, bool use_mask) -> Tensor",
    "_deform_conv2d_backward(Tensor grad, Tensor input, Tensor weight, Tensor offset, Tensor mask, "
    "Tensor bias, SymInt stride_h, SymInt stride_w, SymInt pad_h, SymInt pad_w, SymInt dilation_h, "
    "SymInt dilation_w, SymInt groups, SymInt offset_groups, bool use_mask) -> "
    "(Tensor, Tensor, Tensor, Tensor, Tensor)",
)

# The Library object must outlive the import: dropping it would unregister the schemas.
_schema_library = None


def _extension_loads() -> bool:
    """True when torchvision's own C++ extension loads (then torchvision needs no help)."""
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return True  # not installed: nothing to repair, and the import error will be torchvision's own
    extension_paths = glob.glob(os.path.join(os.path.dirname(spec.origin), "_C*.so")) + glob.glob(
        os.path.join(os.path.dirname(spec.origin), "_C*.pyd")
    )
    if not extension_paths:
        return False
    try:
        torch.ops.load_library(extension_paths[0])
        return True
    except (OSError, RuntimeError):
        return False


def ensure_torchvision_importable() -> bool:
    """Define torchvision's operator schemas if its extension cannot load. Returns True if it acted."""
    global _schema_library
    if _schema_library is not None or _extension_loads():
        return False
    _schema_library = torch.library.Library("torchvision", "DEF")
    for schema in _SCHEMAS:
        _schema_library.define(schema)
    return True


ensure_torchvision_importable()
