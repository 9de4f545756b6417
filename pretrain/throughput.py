"""The GPU throughput levers of pretraining, each one setting of pretrain/utils/arg_util.py's "GPU throughput" block.

Each lever changes how the step runs, not what it computes: tests/test_throughput.py checks that each gives the
default's loss and gradients on a tiny CPU step. Which of them pays on a GPU is measured, not assumed:
`benchmarks/pretrain_levers.py` runs them side by side (notes/performance.md says what was measured).

- channels-last 3D memory format for every 5-D weight of the model (encoder, decoder, projections) and for its 5-D
  inputs: cuDNN's fast 3D convolution kernels on tensor cores work in (B, D, H, W, C) order, and with contiguous
  (B, C, D, H, W) tensors each convolution may pay a transpose on the way in and out;
- `torch.compile` of the model that the step calls (the DDP wrapper, where there is one): fuses the elementwise work
  between convolutions (sparse BatchNorm's masked sums, the mask multiplications, the activations);
- the optimiser's kernels: torch's AdamW as one fused kernel or as multi-tensor ("foreach") kernels instead of one
  launch per parameter and operation (timm's LAMB, the default optimiser, has only its per-parameter loop).
cudnn.benchmark and the DataLoader settings are set where they are used (pretrain/main.py).
"""
import torch

OPTIMIZER_KERNELS = ("default", "foreach", "fused")


def channels_last_inputs(module: torch.nn.Module, inputs: tuple) -> tuple:
    """Forward pre-hook: the call's 5-D tensors (B, C, D, H, W) in channels-last 3D order, the rest as given."""
    return tuple(value.contiguous(memory_format=torch.channels_last_3d)
                 if isinstance(value, torch.Tensor) and value.dim() == 5 else value for value in inputs)


def use_channels_last(model: torch.nn.Module) -> torch.nn.Module:
    """`model` (in place) with its 5-D parameters and buffers, and the 5-D tensors it is called with, in channels-last
    3D order. The parameters stay the same objects, so an optimiser built before or after sees the same ones."""
    model.to(memory_format=torch.channels_last_3d)
    model.register_forward_pre_hook(channels_last_inputs)
    return model


def compiled(model: torch.nn.Module, enabled: bool) -> torch.nn.Module:
    """`torch.compile(model)` when enabled (the compiled module shares the model's parameters), else the model. The
    first steps then take minutes to compile; the module that checkpoints save stays the uncompiled one."""
    return torch.compile(model) if enabled else model


def optimizer_kernel_options(kernel: str) -> dict:
    """Keyword arguments of torch's optimisers for `kernel` (one of OPTIMIZER_KERNELS): "default" leaves torch's own
    choice (foreach on a GPU, the per-parameter loop on the CPU)."""
    if kernel not in OPTIMIZER_KERNELS:
        raise ValueError(f"optimizer kernel {kernel!r} is not one of {', '.join(OPTIMIZER_KERNELS)}")
    return {"foreach": {"foreach": True}, "fused": {"fused": True}}.get(kernel, {})
