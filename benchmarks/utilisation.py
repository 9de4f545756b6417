"""The share of the chip a training run uses: FLOPs per sample as torch counts them, and the device's peak.

Shared by benchmarks/gpu_entry_points.py and benchmarks/pretrain_levers.py (not a script).

- FLOPs: torch's FlopCounterMode over one forward + backward (convolutions and matrix products; elementwise work,
  the loss and the optimiser are not counted). SparK's convolutions run densely on the masked volume, so masked voxels
  count as computed. Counted on the meta device (shapes only, no arithmetic: instant at any size), or on the CPU for a
  step that reads a value (VICReg turns its terms into floats for the log, which a meta tensor cannot give).
- Peak: a large matrix product measured on the device in the same run (bf16 on a GPU, the precision of the entry
  scripts' autocast; fp32 on the CPU), and, where the device is known, the data sheet's dense bf16 figure.
"""
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

# Dense (not 2:4-sparse) bf16 tensor-core TFLOP/s from NVIDIA's data sheets, which give the sparse figure (twice
# this). Matched against the device's name in order: the first entry it contains wins, so the PCIe and NVL cards
# come before the SXM ones their names also contain.
DATA_SHEET_BF16_DENSE_TFLOPS = (
    ("H100 PCIe", 756.0),  # H100 data sheet: 1,513 with sparsity
    ("H100 NVL", 835.5),  # H100 data sheet: 1,671 with sparsity
    ("H200 NVL", 835.5),  # H200 data sheet: 1,671 with sparsity
    ("H100", 989.5),  # H100 SXM ("NVIDIA H100 80GB HBM3"): 1,979 with sparsity
    ("H200", 989.5),  # H200 SXM: 1,979 with sparsity
)


def data_sheet_peak(device_name: str) -> float | None:
    """Dense bf16 FLOP/s from the data sheet for a device name as torch or nvidia-smi give it, or None."""
    for name_part, teraflops in DATA_SHEET_BF16_DENSE_TFLOPS:
        if name_part in device_name:
            return teraflops * 1e12
    return None


def measured_matmul_peak(device: torch.device, size: int = 8192, repeats: int = 20) -> float:
    """FLOP/s of a size × size matrix product on `device`: bf16 on a GPU, fp32 on the CPU. The best a dense kernel
    reaches here, which a nominal peak (clock × units) would need a clock the CPU does not report to give."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    torch.mm(a, b)  # warm-up: kernel choice, clocks
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    for _ in range(repeats):
        torch.mm(a, b)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return repeats * 2 * size**3 / (time.perf_counter() - started)


def counted_flops(step) -> int:
    """FLOPs of `step()` (which runs a forward and its backward), as FlopCounterMode counts them."""
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def pretraining_flops_per_sample(args, segments: list) -> float:
    """Counted FLOPs per sample of one pretraining step of `args.method` (pretrain.utils.arg_util.Args) at the run's
    sizes, through the method's own training_step on two real samples of `segments`: SparK's masking and sparse
    BatchNorm are in it."""
    from pretrain import methods
    from pretrain.models import build_encoder

    method = methods.get(args.method)
    dataset = method.dataset_class(segments, args.reader_settings(), samples_per_epoch=2,
                                   min_mask_fraction=args.min_mask_fraction, seed=args.seed)
    batch = torch.utils.data.default_collate([dataset[(0, index)] for index in range(2)])

    def count_on(device: torch.device) -> int:
        with device:
            model = method.build_model(args, build_encoder(args.model), False)
        model.train()
        return counted_flops(lambda: method.training_step(model, batch, device, False)[0].backward())

    try:
        return count_on(torch.device("meta")) / 2
    except (RuntimeError, NotImplementedError):  # the step reads a value (.item(), float()): count it for real
        return count_on(torch.device("cpu")) / 2


def finetuning_flops_per_sample(model_name: str, depth: int, tile_size: int) -> float:
    """Counted FLOPs per sample of fine-tuning's model (the UNet on the encoder, its default settings) for one forward
    and backward of a (1, depth, tile, tile) tile, on the meta device."""
    from finetune.model import build_ink_unet

    with torch.device("meta"):
        model = build_ink_unet(model_name)
        volume_b1dhw = torch.zeros(2, 1, depth, tile_size, tile_size)
    model.train()
    return counted_flops(lambda: model(volume_b1dhw).float().mean().backward()) / 2


def utilisation(flops_per_sample: float | None, samples_per_s: float | None, peak: float | None) -> dict:
    """Achieved FLOP/s and its share of `peak` (None where a number is missing)."""
    if flops_per_sample is None or samples_per_s is None:
        return {"achieved_flops_per_s": None, "share_of_peak": None}
    achieved = flops_per_sample * samples_per_s
    return {"achieved_flops_per_s": achieved, "share_of_peak": achieved / peak if peak else None}
