"""Predict ink on any segments with a fine-tuned model: the last step of the Grand Prize workflow.

    python finetune/predict.py --checkpoint experiments/finetune_demo/best.pth --segment_id demo:1 demo:2 --output_dir predictions
    python finetune/predict.py --checkpoint RUN/best.pth --segment_id 20230827161847 scroll4:20231107190228 \
        /data/fragment1 --output_dir predictions --tta --overlay
    torchrun --nproc_per_node 4 finetune/predict.py --checkpoint RUN/best.pth --segment_id ... --output_dir predictions

The checkpoint is a fine-tuning run's best.pth or last.pth (finetune/train.py). Its tiles are cut and scaled as the
checkpoint records (model, depth window, normalisation, tile size), and each segment is predicted as train.py
predicts its own: `finetune.inference.predict_segment`, a Gaussian-blended sliding window streamed row band by row
band. Batch size, stride, TTA, DataLoader workers and CPU threads default to the run's own, so that the same segment
gives exactly train.py's prediction.png.

Each segment gives OUTPUT_DIR/<name>.png: uint8 grey at full resolution (0 no ink, 255 certain ink) for an image
editor, <name> being the spec in a form fit for a file name (`scroll4:20231107190228` → `scroll4_20231107190228`,
`/data/fragment1` → `fragment1`, `demo:1` → `demo_1`). With --overlay also <name>_overlay.png: the prediction in
red over the segment's middle layer. A segment whose PNG exists is skipped, so a killed run continues where it
stopped when run again (PNGs are written atomically). Under torchrun each segment's tiles are split over the
processes, and rank 0 writes.
"""
import argparse
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run from anywhere: package imports

import pretrain.torchvision_compat  # noqa: F401,E402 - must precede segmentation_models_pytorch and timm
import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import tqdm  # noqa: E402

from finetune import inference, outputs  # noqa: E402
from finetune.outputs import output_name, output_names  # noqa: E402,F401 - predict.output_name stays its public name
from finetune.model import InkUNet, build_ink_unet  # noqa: E402
from pretrain import checkpoint, dist  # noqa: E402
from pretrain.data.patches import DepthWindow, InputSettings, check_voxel_dtype, normalize_patch  # noqa: E402
from pretrain.data.segment import SegmentError, open_segment  # noqa: E402
from pretrain.utils import errors, misc, ranges  # noqa: E402
from pretrain.utils.errors import OneLineError  # noqa: E402

OVERLAY_INK_BGR = np.array([0, 0, 255], np.float32)  # red: no layer's grey is mistaken for it
OVERLAY_OPACITY = 0.6  # of certain ink: the layer stays visible under it, to judge the prediction by
OVERLAY_STRETCH_PERCENTILES = (1, 99)  # of the papyrus's grey: raw CT layers are dim and low in contrast
# Rows of the overlay blended at a time: in float at once, a 20 000 × 15 000 segment would take some 10 GB.
OVERLAY_ROWS = 512


class ArgumentError(OneLineError, ValueError):
    """An option that cannot work with this checkpoint or launch; the message names it."""


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = errors.ArgumentParser(description=__doc__.split("\n")[0], epilog="Defaults marked 'the run's' are the "
                                     "fine-tuning run's own settings, as its checkpoint records them.")
    parser.add_argument("--checkpoint", required=True, type=pathlib.Path,
                        help="a fine-tuning run's best.pth or last.pth")
    parser.add_argument("--segment_id", required=True, nargs="+", metavar="SPEC",
                        help="segment specs: IDs (scroll 1), scrollN:ID, zarr paths, layer folders, demo[:seed]")
    parser.add_argument("--output_dir", required=True, type=pathlib.Path, help="where the PNGs go")
    parser.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                        help="average over flips and a rot90, 4× the time (default: the run's TTA)")
    parser.add_argument("--overlay", action="store_true", help="also <name>_overlay.png: the prediction over the "
                        "segment's middle layer")
    parser.add_argument("--batch_size", type=ranges.ranged(int, ranges.AT_LEAST_1),
                        help="tiles per batch, all processes together (default: the run's "
                        "BATCH_SIZE)")
    parser.add_argument("--stride", type=ranges.ranged(int, ranges.AT_LEAST_1),
                        help="sliding-window stride in pixels (default: the run's "
                        "INFERENCE_STRIDE)")
    parser.add_argument("--num_workers", type=ranges.ranged(int, ranges.AT_LEAST_0),
                        help="DataLoader workers per process (default: the run's "
                        "NUM_WORKERS)")
    parser.add_argument("--cpu_threads", type=ranges.ranged(int, ranges.AT_LEAST_0),
                        help=f"{dist.CPU_THREADS_HELP} (default: the run's CPU_THREADS)")
    arguments = parser.parse_args(argv)
    return arguments


def read_fine_tuned(path: pathlib.Path) -> tuple[dict, InputSettings]:
    """(the checkpoint, its input settings); anything but a fine-tuning checkpoint is one error naming its kind."""
    saved = checkpoint.read(path)
    if saved["kind"] != "finetune":
        raise checkpoint.CheckpointError(
            f"checkpoint {path} holds {checkpoint.kind_name(saved['kind'])} weights, not a fine-tuned ink model: "
            f"predict.py needs a fine-tuning run's best.pth or last.pth (to fine-tune from this one: "
            f"finetune/train.py --pretrained_path {path})")
    return saved, checkpoint.input_settings(saved)


def build_model(saved: dict, path: pathlib.Path, settings: InputSettings) -> InkUNet:
    """The run's InkUNet (train.py's factory, with the run's decoder settings), holding the checkpoint's weights."""
    config = saved["config"]
    model = build_ink_unet(settings.model, config["DEPTH_POOL"], config["OUTPUT_STRIDE"])
    mismatch = checkpoint.describe_state_dict_mismatch(model.state_dict(), saved["model"])
    if mismatch:
        raise checkpoint.CheckpointError(f"checkpoint {path} does not fit the {settings.model} UNet it names ({mismatch})")
    model.load_state_dict(saved["model"])
    return model


def check_segment(spec: str, settings: InputSettings) -> None:
    """Open the segment (downloading it once, as a run needs it anyway) and check that the model can read it: one
    error naming the segment when it has too few layers for the model's depth window, or float voxels the model
    has no range for."""
    segment = open_segment(spec)
    check_voxel_dtype(segment, settings)
    try:
        DepthWindow(segment.shape[0], settings)
    except SegmentError as error:
        raise SegmentError(f"segment {spec} has {segment.shape[0]} layers, too few for the model, which reads "
                           f"{settings.describe()}: {error}") from None


class ProgressImage:
    """The (Y, X) output of `predict_segment` kept as the uint8 prediction image (a quarter of the float map's
    memory), advancing a progress bar by the rows written: predict_segment writes finished row bands in order."""

    def __init__(self, shape_yx: tuple[int, int], progress: tqdm.tqdm):
        self.image_yx = np.zeros(shape_yx, np.uint8)
        self.progress = progress

    def __setitem__(self, rows: slice, probabilities_yx: np.ndarray) -> None:
        self.image_yx[rows] = outputs.probability_image(probabilities_yx)
        self.progress.update(len(probabilities_yx))


def overlay_image(segment, prediction_yx: np.ndarray, settings: InputSettings) -> np.ndarray:
    """(caption + Y, X, 3) uint8 BGR: the prediction in red over the segment's middle layer, its grey stretched
    over the papyrus, under a caption saying so. Made OVERLAY_ROWS rows at a time."""
    middle = segment.shape[0] // 2
    height, width = prediction_yx.shape
    blocks = [slice(y, y + OVERLAY_ROWS) for y in range(0, height, OVERLAY_ROWS)]
    layer_yx = np.zeros((height, width), np.uint16)  # the layer scaled to 0..1 as the model reads it, in 1/65535
    for rows in blocks:
        scaled_yx = normalize_patch(segment.volume[middle, rows], "range", float_range=settings.float_range)
        layer_yx[rows] = np.rint(np.clip(scaled_yx, 0, 1) * 65535)
    low, high = np.percentile(layer_yx[segment.mask], OVERLAY_STRETCH_PERCENTILES)
    image = np.zeros((height, width, 3), np.uint8)
    for rows in blocks:
        grey_yx = np.clip((layer_yx[rows] - np.float32(low)) / np.float32(max(high - low, 1)), 0, 1) * 255
        ink_yx1 = prediction_yx[rows, :, None].astype(np.float32) / 255 * OVERLAY_OPACITY
        image[rows] = np.rint(grey_yx[..., None] * (1 - ink_yx1) + OVERLAY_INK_BGR * ink_yx1)
    caption = outputs.text_strip(width, max(4, width // 100),
                                 [[(0, f"ink probability in red over layer {middle}", outputs.CAPTION_BGR)]])
    return np.concatenate([caption, image], axis=0)


def predict_one(model: InkUNet, spec: str, settings: InputSettings, arguments, device: torch.device, label: str):
    """The (Y, X) uint8 prediction image of one segment (meaningful on rank 0, which gathers the row bands)."""
    segment = open_segment(spec)
    with tqdm.tqdm(total=segment.shape[1], unit="row", desc=label, disable=not dist.is_master()) as progress:
        image = ProgressImage(segment.shape[1:], progress)
        inference.predict_segment(model, segment, segment.mask, settings, arguments.stride,
                                  arguments.batch_size // dist.world_size(), device, arguments.tta,
                                  arguments.num_workers, output_yx=image)
    return segment, image.image_yx


def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    errors.name_run(f"{arguments.checkpoint} → {arguments.output_dir}", arguments.output_dir)
    misc.check_writable_folder(arguments.output_dir, "--output_dir")
    device = dist.initialize()
    # Every user error (checkpoint, specs, segments) surfaces before anything is written.
    saved, settings = read_fine_tuned(arguments.checkpoint)
    config = saved["config"]
    for name, setting in (("tta", "TTA"), ("batch_size", "BATCH_SIZE"), ("stride", "INFERENCE_STRIDE"),
                          ("num_workers", "NUM_WORKERS"), ("cpu_threads", "CPU_THREADS")):
        if getattr(arguments, name) is None:
            setattr(arguments, name, config[setting])
    if arguments.batch_size % dist.world_size():
        raise ArgumentError(f"--batch_size {arguments.batch_size} is not divisible by the {dist.world_size()} processes")
    dist.set_cpu_threads(device, arguments.cpu_threads, arguments.num_workers)
    model = build_model(saved, arguments.checkpoint, settings).to(device)
    names = output_names(arguments.segment_id)
    # Decided once, before any process writes, so that every process walks the same segments in step.
    finished = [(arguments.output_dir / f"{name}.png").is_file() for name in names]
    wanted = [(spec, name) for spec, name, done in zip(arguments.segment_id, names, finished) if not done]
    for spec, _ in wanted:
        check_segment(spec, settings)
    dist.barrier()

    if dist.is_master():
        arguments.output_dir.mkdir(parents=True, exist_ok=True)
        misc.remove_stale_temporaries(arguments.output_dir)
        print(f"{settings.model} UNet from {arguments.checkpoint}; input {settings.describe()}; stride "
              f"{arguments.stride}, batch {arguments.batch_size}{', TTA' if arguments.tta else ''}; "
              f"{len(wanted)} of {len(names)} segment(s) to predict on {dist.world_size()} process(es)")
        for spec, name, done in zip(arguments.segment_id, names, finished):
            if done:
                print(f"{spec}: skipped, {arguments.output_dir / name}.png exists")
                overlay_path = arguments.output_dir / f"{name}_overlay.png"
                if arguments.overlay and not overlay_path.is_file():  # asked for now: from the prediction made then
                    prediction_yx = cv2.imread(str(arguments.output_dir / f"{name}.png"), cv2.IMREAD_GRAYSCALE)
                    outputs.write_png_atomic(overlay_path, overlay_image(open_segment(spec), prediction_yx, settings))
    for number, (spec, name) in enumerate(wanted, start=1):
        segment, prediction_yx = predict_one(model, spec, settings, arguments, device,
                                             f"segment {number}/{len(wanted)} {name}")
        if dist.is_master():
            path = arguments.output_dir / f"{name}.png"
            if arguments.overlay:  # before the prediction, whose PNG marks the segment finished
                outputs.write_png_atomic(arguments.output_dir / f"{name}_overlay.png",
                                         overlay_image(segment, prediction_yx, settings))
            outputs.write_png_atomic(path, prediction_yx)
            print(f"{spec}: {path} ({segment.shape[2]} × {segment.shape[1]} pixels)")
    return 0


if __name__ == "__main__":
    errors.install(__file__)
    exit_code = main()
    dist.finalize()
    sys.exit(exit_code)
