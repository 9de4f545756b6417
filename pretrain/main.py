"""Self-supervised pretraining of a 3D ResNet encoder on unlabeled segments: SparK-3D (default), VICReg, or any
method of pretrain/methods.py.

    python pretrain/main.py                      # the defaults of pretrain/utils/arg_util.py (demo segment; no GPU:
                                                 # the narrow model on fewer crops, as its first line says)
    python pretrain/main.py --ep 3 --data_path 20230827161847
    python pretrain/main.py --method vicreg --exp_dir experiments/vicreg_demo
    torchrun --nproc_per_node 4 pretrain/main.py --bs 32

Writes to exp_dir, every epoch and atomically: the full checkpoint (`<model>_withdecoder_spark_style.pth`,
`<model>_withprojector_vicreg_style.pth`: everything needed to resume) and `<model>_timm_style.pth`
(encoder weights only, dense names, for fine-tuning), plus `log.jsonl` and `tensorboard_logs/`. Running
the same command again continues where it stopped.
"""
import os
import pathlib
import sys
import time

from pretrain.utils import errors

if __name__ == "__main__":  # before arg_util.py is read: a mistake typed into it is one line too
    errors.install(__file__, settings_files=(pathlib.Path(__file__).parent / "utils" / "arg_util.py",))

import pretrain.torchvision_compat  # noqa: F401,E402 - must precede timm (LAMB)
import torch  # noqa: E402
import tqdm  # noqa: E402

from pretrain import checkpoint, dist, methods, throughput  # noqa: E402
from pretrain.data.patches import EpochSampler, voxel_dtypes  # noqa: E402
from pretrain.data.segment import open_segment  # noqa: E402
from pretrain.models import build_encoder  # noqa: E402
from pretrain.probe import OnlineProbe  # noqa: E402
from pretrain.utils import arg_util, folder_lock, misc, schedule  # noqa: E402


def build_model(args: arg_util.Args) -> torch.nn.Module:
    model = methods.get(args.method).build_model(args, build_encoder(args.model), args.sbn and dist.is_distributed())
    return throughput.use_channels_last(model) if args.channels_last else model


def build_optimizer(args: arg_util.Args, model: torch.nn.Module) -> torch.optim.Optimizer:
    groups = schedule.parameter_groups(model)
    if args.opt == "lamb":
        import timm.optim

        return timm.optim.Lamb(groups, lr=args.lr, weight_decay=args.wd, max_grad_norm=None)
    return torch.optim.AdamW(groups, lr=args.lr, weight_decay=args.wd, betas=(0.9, 0.95),
                             **throughput.optimizer_kernel_options(args.optimizer_kernel))


def load_start_state(args: arg_util.Args, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[int, int]:
    """Resume (model, optimizer, epoch) or load init weights. Returns (start epoch, global step). No RNG state is
    restored: every epoch seeds its own (train_one_epoch), so each rank keeps its own randomness on resume."""
    resume_from = args.resume_from or (args.checkpoint_path if os.path.isfile(args.checkpoint_path) else "")
    if resume_from:
        saved = checkpoint.read(resume_from)
        if saved["kind"] not in methods.METHODS:
            raise checkpoint.CheckpointError(f"{resume_from} is not a full pretraining checkpoint (*_with*_style.pth) "
                                             f"but a {checkpoint.kind_name(saved['kind'])} one")
        if saved["kind"] != args.method:
            raise checkpoint.CheckpointError(f"{resume_from} is a {saved['kind']} checkpoint; this run pretrains with "
                                             f"{args.method} (use init_weight to start from its encoder)")
        settings = checkpoint.input_settings(saved)
        if settings.model != args.model:
            raise checkpoint.CheckpointError(f"{resume_from} holds a {settings.model} model; this run builds "
                                             f"{args.model} (set --model or another resume_from)")
        if settings != args.input_settings():
            raise checkpoint.CheckpointError(
                f"{resume_from} was pretrained on {settings.describe()}; this run reads {args.input_settings().describe()} "
                "(resume with the same data settings, or start another exp_dir)")
        checkpoint.restore(saved, model, optimizer, resume_from)
        print(f"resumed from {resume_from}: epoch {saved['epoch'] + 1} of {args.ep} done")
        return saved["epoch"] + 1, saved["global_step"]
    if args.init_weight:
        weights = checkpoint.encoder_weights(args.init_weight)
        checkpoint.load_encoder(methods.get(args.method).dense_encoder(model), weights, args.model, "--model")
        print(f"initialised the encoder with {weights.description}")
    return 0, 0


def save_encoders(args: arg_util.Args, model: torch.nn.Module, epoch: int) -> None:
    """The encoder alone, with the input settings it learnt from: what fine-tuning and evaluation load."""
    if not dist.is_master():
        return
    paths = [args.encoder_checkpoint_path]
    if args.keep_epoch_encoders:
        paths.append(checkpoint.encoder_file(args.exp_dir, args.model, epoch + 1))
        paths[-1].parent.mkdir(exist_ok=True)
    encoder = methods.get(args.method).dense_encoder(model)
    for path in paths:
        checkpoint.save(path, "encoder", encoder.state_dict(), args.input_settings(), method=args.method,
                        epoch=epoch + 1)


def save_full_checkpoint(args: arg_util.Args, model: torch.nn.Module, optimizer: torch.optim.Optimizer, epoch: int,
                         global_step: int) -> None:
    if dist.is_master():
        checkpoint.save(args.checkpoint_path, args.method, model.state_dict(), args.input_settings(),
                        args=args.settings(), epoch=epoch, global_step=global_step, optimizer=optimizer.state_dict())


def middle_layer_image(volumes_bcdhw: list[torch.Tensor]) -> torch.Tensor:
    """(1, H, n·W) grid of the middle layer of sample 0 of each volume, each scaled by its own range
    (a texture target and the masked input have different units)."""
    middle = volumes_bcdhw[0].shape[2] // 2
    panels = [volume[0, 0, middle].detach().float() for volume in volumes_bcdhw]
    return torch.cat([(panel - panel.min()) / (panel.max() - panel.min() + 1e-6) for panel in panels], dim=1).unsqueeze(0)


def train_one_epoch(args, model, ddp_model, optimizer, loader, epoch, global_step, tensorboard,
                    progress: tqdm.tqdm) -> tuple[dict, int]:
    model.train()
    # This epoch's crops come from (seed, epoch, index) keys that the sampler hands to the DataLoader workers,
    # and its masks from a generator seeded by (seed, rank, epoch): each rank draws its own, and a resumed
    # run draws exactly what an uninterrupted one would have.
    loader.sampler.set_epoch(epoch)
    torch.manual_seed(misc.epoch_seed(args.seed, dist.rank(), epoch))
    iterations_per_epoch = len(loader)
    total_iterations = args.ep * iterations_per_epoch
    warmup_iterations = max(1, args.wp_ep * iterations_per_epoch)
    device = torch.device(args.device)
    method = methods.get(args.method)
    loss_sum, wait_seconds, step_seconds = 0.0, 0.0, 0.0
    method_sums = {}  # epoch sums of the method's own scalars (VICReg's terms and embedding std) for log.jsonl
    progress.set_description(f"epoch {epoch + 1}/{args.ep}")
    tick = time.perf_counter()
    for iteration, batch in enumerate(loader):
        wait_seconds += time.perf_counter() - tick
        lr = schedule.lr_at(global_step, args.lr, warmup_iterations, total_iterations)
        wd = schedule.wd_at(global_step, args.wd, args.wde, total_iterations)
        schedule.apply(optimizer, lr, wd)
        show = dist.is_master() and (
            (args.vis_every and global_step % args.vis_every == 0) or iteration == iterations_per_epoch - 1)
        with dist.autocast(device, enabled=args.amp):
            loss, method_scalars, panels = method.training_step(ddp_model, batch, device, show)
        loss_value, grad_norm = schedule.optimizer_step(
            loss, model, optimizer, args.clip, f"epoch {epoch + 1}, iteration {iteration}",
            f"The last good checkpoint is {args.checkpoint_path}; try a lower base_lr or a stricter clip")

        loss_sum += loss_value
        for name, value in method_scalars.items():
            method_sums[name] = method_sums.get(name, 0.0) + float(value)
        step_seconds_now = time.perf_counter() - tick
        step_seconds += step_seconds_now
        samples_per_second = args.bs / max(step_seconds_now, 1e-9)
        tensorboard.scalars(global_step, train__loss=loss_value, hp__lr=lr, hp__wd=wd, train__grad_norm=grad_norm,
                            perf__samples_per_s=samples_per_second, **method_scalars)
        if panels is not None:
            tensorboard.image(method.image_tag, middle_layer_image(panels), global_step)
        progress.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", refresh=False)
        progress.update()
        global_step += 1
        tick = time.perf_counter()
    stats = {"loss": loss_sum / iterations_per_epoch, "data_wait_fraction": wait_seconds / max(step_seconds, 1e-9),
             "samples_per_s": args.bs * iterations_per_epoch / max(step_seconds, 1e-9),
             **{name: total / iterations_per_epoch for name, total in method_sums.items()}}
    tensorboard.scalars(global_step, epoch__loss=stats["loss"], perf__data_wait_fraction=stats["data_wait_fraction"])
    return stats, global_step


def build_loader(args: arg_util.Args, segments: list, device: torch.device) -> torch.utils.data.DataLoader:
    """The method's random-crop dataset behind an EpochSampler: this rank's share of every epoch's crops."""
    dataset_class = methods.get(args.method).dataset_class
    try:
        dataset = dataset_class(segments, args.reader_settings(), samples_per_epoch=args.samples_per_ep,
                                min_mask_fraction=args.min_mask_fraction, seed=args.seed)
    except ValueError as error:  # SegmentError included: a window or tile the segments cannot give
        raise arg_util.ArgumentError(str(error)) from error
    sampler = EpochSampler(len(dataset), dist.rank(), dist.world_size())
    # A generator of the loader's own: starting the workers would otherwise take a draw from the global one, and a
    # resumed run (which starts them in another epoch) would then draw other masks than an uninterrupted one.
    generator = torch.Generator().manual_seed(args.seed + dist.rank())
    return torch.utils.data.DataLoader(
        dataset, batch_size=args.batch_size_per_process, sampler=sampler, num_workers=args.num_workers,
        drop_last=True, pin_memory=args.pin_memory and device.type == "cuda", persistent_workers=args.num_workers > 0,
        prefetch_factor=args.prefetch_factor if args.num_workers > 0 else None, generator=generator)


def main() -> int:
    args = arg_util.parse_args()
    errors.name_run(args.exp_name, args.exp_dir)
    device = dist.initialize(args.dist_timeout_minutes)
    cpu_defaults = args.use_cpu_defaults() if device.type == "cpu" else ""
    if cpu_defaults and dist.is_master():
        print(cpu_defaults, flush=True)
    args.fill_runtime(str(device), dist.world_size())
    dist.set_cpu_threads(device, args.cpu_threads, args.num_workers)
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    torch.manual_seed(args.seed + dist.rank())
    # Every user error (data, settings, checkpoints) surfaces before anything is written to exp_dir.
    segments = open_segment(args.data_path, scroll=args.scroll, lru_bytes=args.lru_mb * 2**20)
    args.voxel_dtype = voxel_dtypes(segments)
    loader = build_loader(args, segments, device)
    ink_probe = OnlineProbe.build(args, segments)

    try:
        model = build_model(args).to(device)
    except ValueError as error:  # e.g. a grid too small to mask: a setting the user chose
        raise arg_util.ArgumentError(str(error)) from error
    optimizer = build_optimizer(args, model)
    start_epoch, global_step = load_start_state(args, model, optimizer)
    try:
        os.makedirs(args.exp_dir, exist_ok=True)
        folder_lock.hold(args.exp_dir, "pretraining run")  # a second run in exp_dir stops here, before writing
        misc.remove_stale_temporaries(args.exp_dir)
        probe = pathlib.Path(args.exp_dir, f".write_test_{os.getpid()}")
        probe.touch()
        probe.unlink()
    except OSError as error:
        raise arg_util.ArgumentError(f"exp_dir {args.exp_dir} is not writable: {error.strerror}") from error
    log = misc.JsonLinesLog(os.path.join(args.exp_dir, "log.jsonl"))
    log.write(event="start", command=args.command, commit=args.commit, args=args.settings())
    tensorboard = misc.TensorboardLogger(os.path.join(args.exp_dir, "tensorboard_logs"))
    tensorboard.text("config", f"```\n{args.to_json()}\n```")
    ddp_model = throughput.compiled(dist.wrap(model, device), args.compile_model)  # what the step calls
    summary = methods.get(args.method).summary(model)
    if dist.is_master():
        print(f"{args.method} {args.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters; "
              f"{len(segments)} segment(s){summary}; {len(loader)} iterations per epoch on {dist.world_size()} process(es)"
              + (f", {torch.get_num_threads()} torch thread(s) each" if device.type == "cpu" else ""))
    ink_probe.start(log, tensorboard)

    last_epoch = min(args.ep, args.stop_after_ep) if args.stop_after_ep else args.ep
    # One bar for the whole run, so that tqdm's estimate is the time the run has left, not the epoch. Closed on any
    # way out (a `with`), so that an error's one line starts a line of its own.
    with tqdm.tqdm(initial=start_epoch * len(loader), total=last_epoch * len(loader), unit="step",
                   desc=f"epoch {start_epoch + 1}/{args.ep}",
                   disable=not dist.is_master() or start_epoch >= last_epoch) as progress:
        for epoch in range(start_epoch, last_epoch):
            started = time.time()
            stats, global_step = train_one_epoch(args, model, ddp_model, optimizer, loader, epoch, global_step,
                                                 tensorboard, progress)
            stats.update(ink_probe.after_epoch(model, epoch, global_step, tensorboard))
            # The full checkpoint goes last: it is what marks the epoch done for a resume, so a kill before it
            # trains the epoch again instead of leaving its encoders or its log record behind.
            save_encoders(args, model, epoch)
            log.write(event="epoch", epoch=epoch + 1, global_step=global_step, seconds=round(time.time() - started, 1),
                      **stats)
            save_full_checkpoint(args, model, optimizer, epoch, global_step)
            tensorboard.flush()
            if dist.is_master():
                progress.write(f"epoch {epoch + 1}/{args.ep}: loss {stats['loss']:.4f}, {time.time() - started:.0f} s, "
                               f"{stats['samples_per_s']:.2f} samples/s")
    tensorboard.close()
    if dist.is_master():
        state = "done" if last_epoch == args.ep else f"stopped after epoch {last_epoch} of {args.ep} (run again to continue)"
        print(f"{state}: encoder weights for fine-tuning in {args.encoder_checkpoint_path}")
    return 0


if __name__ == "__main__":
    exit_code = main()
    dist.finalize()  # main() has returned, so its DDP model is gone before the process group
    sys.exit(exit_code)
