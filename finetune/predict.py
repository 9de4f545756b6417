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
editor, <name> being the segment's one name whatever the spelling (`finetune.outputs.output_name`:
`scroll4:20231107190228` → `scroll4_20231107190228`, `demo:01` → `demo_1`, a bare scroll-1 ID as it is) and, for a
local folder, its name and a digest of its resolved path (`/data/fragment1` → `fragment1-<8 hex>`), so that two
folders' `seg.zarr` never share a file. With --overlay also <name>_overlay.png: the prediction in red over the
segment's middle layer, with its colour scale. Beside each PNG, <name>.json records what made it: the segment's
identity, the checkpoint's content digest (sha256 of the file), the stride and TTA, and the score when the segment
has ink labels. A segment is skipped only when that record says its PNG was made from this segment with this
checkpoint and these settings, so a killed run continues where it stopped when run again (PNGs and records are
written atomically), and anything else is predicted again. A segment with ink labels of its own is scored against
them (F0.5 at its best threshold, and AUC, as fine-tuning's metrics). The stride is at most the tile side: a larger
one would leave the pixels between tiles unpredicted. The output folder is locked while a run writes to it: a
second run there is refused in one line naming the first. Under torchrun each segment's tiles are split over the
processes, and rank 0 writes.
"""
import argparse
import json
import pathlib
import sys

import pretrain.torchvision_compat  # noqa: F401 - must precede segmentation_models_pytorch and timm
import cv2
import numpy as np
import torch
import tqdm

from finetune import data, evaluation, inference, outputs
from finetune.metrics import ink_metrics
from finetune.model import InkUNet, build_ink_unet
from pretrain import checkpoint, dist
from pretrain.data.patches import DepthWindow, InputSettings, check_voxel_dtype, normalize_patch
from pretrain.data.segment import SegmentError, open_segment, segment_identity
from pretrain.utils import errors, folder_lock, misc, ranges
from pretrain.utils.errors import OneLineError

OVERLAY_INK_BGR = np.array([0, 0, 255], np.float32)  # red: no layer's grey is mistaken for it
OVERLAY_OPACITY = 0.6  # of certain ink: the layer stays visible under it, to judge the prediction by
OVERLAY_STRETCH_PERCENTILES = (1, 99)  # of the papyrus's grey: raw CT layers are dim and low in contrast
# Rows of the overlay blended at a time: in float at once, a 20 000 × 15 000 segment would take some 10 GB.
OVERLAY_ROWS = 512
SCALE_GREY = 128  # the grey under the overlay's colour scale: a mid-grey papyrus


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


def output_name(spec: str) -> str:
    """The file name (without suffix) of a segment's outputs here: one per segment, never shared by two
    (`finetune.outputs.output_name` with `unique`)."""
    return outputs.output_name(spec, unique=True)


def made_by(spec: str, checkpoint_digest: str, arguments) -> dict:
    """What decides a segment's prediction: the segment (its identity), the checkpoint (its content) and the options
    that change the map (stride, TTA; batch size, workers and threads do not)."""
    return {"segment": segment_identity(spec), "checkpoint_sha256": checkpoint_digest, "stride": arguments.stride,
            "tta": arguments.tta}


def is_finished(output_dir: pathlib.Path, name: str, expected: dict) -> bool:
    """Whether <name>.png is there and its record says it was made as `expected` says (made_by)."""
    try:
        return (output_dir / f"{name}.png").is_file() and \
            json.loads((output_dir / f"{name}.json").read_text())["made_by"] == expected
    except (OSError, ValueError, KeyError, TypeError):  # no record, or one cut short or from elsewhere: predict again
        return False


def score(segment, prediction_yx: np.ndarray) -> dict | None:
    """F0.5 (at the threshold best on these pixels), AUC and the chance level of the prediction against the
    segment's own ink labels (and negatives, if it has them) within its mask; None without labels."""
    if segment.inklabels is None:
        return None
    labels_yx = data.training_labels(segment.inklabels, segment.negatives)
    scored_yx = segment.mask & (labels_yx != data.UNKNOWN)
    return ink_metrics(prediction_yx[scored_yx] / 255.0, labels_yx[scored_yx] == 1).as_dict()


def describe_score(metrics: dict) -> str:
    return (f"against its own ink labels, {metrics['pixels']} pixels: {evaluation.describe(metrics)} (the threshold "
            "is chosen on these pixels; pixels the model trained on, if any, score higher than unseen ones)")


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
                                 [[(0, f"ink probability in red over layer {middle}, scale:", outputs.CAPTION_BGR)]])
    return np.concatenate([caption, colour_scale(width), image], axis=0)


def colour_scale(width: int) -> np.ndarray:
    """(H, width, 3) uint8 BGR: the overlay's colour for each probability from 0 (left) to 1 (right) over a mid-grey
    papyrus, between the labels '0' and '1', under a white line as the caption's."""
    margin, bar_height = max(2, width // 60), max(6, width // 60)
    font_scale = bar_height / cv2.getTextSize("0", outputs.CAPTION_FONT, 1.0, 1)[0][1]
    thickness = max(1, round(font_scale * 1.5))
    label_width = cv2.getTextSize("0", outputs.CAPTION_FONT, font_scale, thickness)[0][0]
    gap = max(2, width // 100)
    strip = np.zeros((2 * margin + bar_height + gap, width, 3), np.uint8)
    x0, x1 = 2 * margin + label_width, width - 2 * margin - label_width
    ink_x1 = np.linspace(0, 1, max(x1 - x0, 1), dtype=np.float32)[:, None] * OVERLAY_OPACITY  # (X, 1)
    strip[margin:margin + bar_height, x0:x1] = np.rint(SCALE_GREY * (1 - ink_x1) + OVERLAY_INK_BGR * ink_x1)[:x1 - x0]
    for x, text in ((margin, "0"), (x1 + margin, "1")):
        cv2.putText(strip, text, (x, margin + bar_height), outputs.CAPTION_FONT, font_scale, outputs.CAPTION_BGR,
                    thickness, cv2.LINE_AA)
    strip[-gap:] = 255
    return strip


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
    if arguments.stride > settings.tile_size:
        raise ArgumentError(f"--stride {arguments.stride} is larger than the model's tile side {settings.tile_size}: "
                            f"the pixels between tiles would stay unpredicted; give a stride of at most "
                            f"{settings.tile_size}")
    if arguments.batch_size % dist.world_size():
        raise ArgumentError(f"--batch_size {arguments.batch_size} is not divisible by the {dist.world_size()} processes")
    dist.set_cpu_threads(device, arguments.cpu_threads, arguments.num_workers)
    model = build_model(saved, arguments.checkpoint, settings).to(device)
    output_dir = arguments.output_dir
    names = outputs.output_names(arguments.segment_id, unique=True)
    checkpoint_digest = misc.file_sha256(arguments.checkpoint)
    expected = [made_by(spec, checkpoint_digest, arguments) for spec in arguments.segment_id]
    try:
        # What a folder holds is judged under its lock (a new folder holds nothing, and is locked as it is made).
        # Decided once, before any process writes, so that every process walks the same segments in step.
        if output_dir.is_dir():
            folder_lock.hold(output_dir, "prediction run")
        finished = [is_finished(output_dir, name, made) for name, made in zip(names, expected)]
        wanted = [(spec, name, made) for spec, name, made, done in zip(arguments.segment_id, names, expected, finished)
                  if not done]
        for spec, _, _ in wanted:
            check_segment(spec, settings)
        dist.barrier()
        folder_lock.hold(output_dir, "prediction run")
        if dist.is_master():
            misc.remove_stale_temporaries(output_dir)
            print(f"{settings.model} UNet from {arguments.checkpoint}; input {settings.describe()}; stride "
                  f"{arguments.stride}, batch {arguments.batch_size}{', TTA' if arguments.tta else ''}; "
                  f"{len(wanted)} of {len(names)} segment(s) to predict on {dist.world_size()} process(es)")
            for spec, name, done in zip(arguments.segment_id, names, finished):
                if done:
                    print(f"{spec}: skipped, {output_dir / name}.png was made from this segment with this checkpoint "
                          "and settings")
                    recorded = json.loads((output_dir / f"{name}.json").read_text())["score"]
                    if recorded is not None:
                        print(f"{spec}: scored {describe_score(recorded)}")
                    overlay_path = output_dir / f"{name}_overlay.png"
                    if arguments.overlay and not overlay_path.is_file():  # asked for now: from the prediction made then
                        prediction_yx = cv2.imread(str(output_dir / f"{name}.png"), cv2.IMREAD_GRAYSCALE)
                        outputs.write_png_atomic(overlay_path, overlay_image(open_segment(spec), prediction_yx, settings))
                        print(f"{spec}: overlay {overlay_path}")
        for number, (spec, name, made) in enumerate(wanted, start=1):
            segment, prediction_yx = predict_one(model, spec, settings, arguments, device,
                                                 f"segment {number}/{len(wanted)} {name}")
            if dist.is_master():
                write_outputs(output_dir, name, spec, segment, prediction_yx, made, arguments, settings)
    finally:
        folder_lock.release(output_dir)
    return 0


def write_outputs(output_dir: pathlib.Path, name: str, spec: str, segment, prediction_yx: np.ndarray, made: dict,
                  arguments, settings: InputSettings) -> None:
    """The segment's PNG, its overlay if asked, and last the record that marks them finished; what an earlier
    prediction left under these names goes first, so that no record ever vouches for another prediction's PNG."""
    path, record_path = output_dir / f"{name}.png", output_dir / f"{name}.json"
    overlay_path = output_dir / f"{name}_overlay.png"
    record_path.unlink(missing_ok=True)
    overlay_path.unlink(missing_ok=True)
    if arguments.overlay:
        outputs.write_png_atomic(overlay_path, overlay_image(segment, prediction_yx, settings))
    outputs.write_png_atomic(path, prediction_yx)
    metrics = score(segment, prediction_yx)
    record = {"made_by": made, "spec": spec, "checkpoint": str(arguments.checkpoint), "prediction": path.name,
              "score": metrics}
    misc.write_bytes_atomic(record_path, (json.dumps(record, indent=1) + "\n").encode())
    print(f"{spec}: {path} ({segment.shape[2]} × {segment.shape[1]} pixels)"
          + (f"; overlay {overlay_path}" if arguments.overlay else ""))
    if metrics is not None:
        print(f"{spec}: scored {describe_score(metrics)}")


if __name__ == "__main__":
    errors.install(__file__)
    exit_code = main()
    dist.finalize()
    sys.exit(exit_code)
