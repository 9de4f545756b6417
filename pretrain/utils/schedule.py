"""Learning-rate and weight-decay schedules, per iteration (as SparK's lr_control does), and the optimizer step
both training scripts take.

lr: linear warm-up from ~0 to the peak over the warm-up iterations, then half-cosine down to
`min_lr_ratio` × peak. wd: half-cosine from `wd` to `wd_end` over the whole run (SparK raises weight
decay as training proceeds). Parameters whose group has `weight_decay_scale = 0` (norms, biases, mask
tokens) keep zero weight decay.
"""
import math

import torch

from pretrain import dist
from pretrain.utils.errors import OneLineError


class NonFiniteLossError(OneLineError, RuntimeError):
    """The loss became NaN or infinite: the run stops, its last checkpoint intact."""

    exit_status = 1


def optimizer_step(loss: torch.Tensor, model: torch.nn.Module, optimizer: torch.optim.Optimizer, clip: float,
                   where: str, advice: str) -> tuple[float, float]:
    """One training step of either script: the loss checked, backward, the gradients clipped to norm `clip` (0: no
    clip), the step. Returns (the loss averaged over processes, the gradient norm before clipping). The check uses
    the average, so every rank stops at the same step with the same message (a rank stopping alone would leave the
    others waiting in backward for the collective timeout). `where` and `advice` complete its message."""
    loss_value = dist.all_reduce_mean(loss).item()
    if not math.isfinite(loss_value):
        raise NonFiniteLossError(f"loss is {loss_value} at {where}; stopping. {advice}")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_([parameter for parameter in model.parameters() if parameter.requires_grad],
                                               clip if clip > 0 else math.inf)
    optimizer.step()
    return loss_value, float(grad_norm)


def lr_at(iteration: int, peak_lr: float, warmup_iterations: int, total_iterations: int, min_lr_ratio: float = 0.01) -> float:
    if iteration < warmup_iterations:
        return peak_lr * (iteration + 1) / warmup_iterations
    progress = (iteration - warmup_iterations) / max(1, total_iterations - warmup_iterations)
    return peak_lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def wd_at(iteration: int, wd: float, wd_end: float, total_iterations: int) -> float:
    progress = iteration / max(1, total_iterations - 1)
    return wd_end + (wd - wd_end) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def apply(optimizer: torch.optim.Optimizer, lr: float, weight_decay: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
        group["weight_decay"] = weight_decay * group.get("weight_decay_scale", 1.0)


def parameter_groups(model: torch.nn.Module) -> list[dict]:
    """Two groups: weights that decay, and 1-D parameters / mask tokens that do not (as SparK and MAE)."""
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        if parameter.ndim <= 1 or name.endswith(".bias") or "mask_token" in name:
            no_decay.append(parameter)
        else:
            decay.append(parameter)
    return [{"params": decay, "weight_decay_scale": 1.0}, {"params": no_decay, "weight_decay_scale": 0.0}]
