"""The online ink probe: how well a linear read-out of the encoder's features finds ink, watched while pretraining.

Every `probe_every` epochs (and after the last), rank 0 copies the encoder into a dense one and computes its features
with gradients off (eval mode, `Method.probe_features`) on a fixed set of labelled tiles held in memory, cut and scaled
by the method's own input settings through the tile reader fine-tuning uses (`GridTileDataset`). A logistic regression
is fitted on the pixels of one half of the tiles and scores the other half: AUC and average precision (threshold-free)
and F0.5 at the threshold best on the fitted half, beside calling every pixel ink (chance). The same probe of the run's
random initialisation (its seed, the same tiles) is every curve's baseline: computed once, kept in log.jsonl, read back
on resume. Under torchrun the other ranks wait at a barrier, at most `dist_timeout_minutes`.

The tiles lie on one grid at a stride of one tile, so no pixel belongs to a fitted tile and a scored one; the split is
checked (`assert_disjoint`) and recorded. It is stratified by ink: both halves hold inked tiles and bare papyrus.
"""
import dataclasses

import numpy as np
import torch

from finetune.metrics import all_ink_f05, average_precision, best_threshold, f05_at, roc_auc
from pretrain import dist, methods
from pretrain.data.patches import MOSTLY_PAPYRUS, GridTileDataset, InputSettings, tile_origins
from pretrain.data.segment import Segment, SegmentError, open_segment
from pretrain.models import build_encoder
from pretrain.utils import run_log

# Tiles held in memory at most: 24 tiles of 16 × 96² voxels are 14 MB; at 32 × 256², 24 tiles would be 200 MB.
CACHE_BYTES = 256 * 2**20
INKED_TILE = 0.01  # a tile with at least this fraction of ink pixels counts as inked when the tiles are chosen
FIT_PIXELS_PER_TILE = 512  # of each fitted tile's feature grid: bounds the head's data at large tiles and wide encoders
HEAD_ITERATIONS = 100  # L-BFGS iterations of the logistic regression at most: a fixed budget
HEAD_INVERSE_REGULARISATION = 0.1  # scikit-learn's C, as evaluate/ink_map.py's linear probe
FEATURE_BATCH = 4  # tiles per forward
THRESHOLDS = tuple(np.round(np.linspace(0.0, 0.99, 100), 2))  # F0.5's sweep on the fitted half; 0 = all ink (chance)
SHOWN_TILES = 4  # scored tiles in the TensorBoard image
BASELINE_EVENT = "probe_baseline"  # the log.jsonl record of the tiles and the random initialisation's scores
SCORES = ("auc", "ap", "f05")


@dataclasses.dataclass
class ProbeTiles:
    """The probe's labelled tiles, read once: `fit` tiles train the head, the others are scored."""

    segment_name: str
    settings: InputSettings
    origins: np.ndarray  # (N, 2) int64 (y, x) top-left corners, one grid at a stride of tile_size
    fit: np.ndarray  # (N,) bool
    volumes: torch.Tensor  # (N, 1, D, T, T) float32, as the encoder reads them
    labels: np.ndarray  # (N, T, T) bool: ink
    mask: np.ndarray  # (N, T, T) bool: papyrus

    def record(self) -> dict:
        """What identifies the tiles in log.jsonl: a resumed run reuses the baseline only for the same ones."""
        return {"segment": self.segment_name, "input": self.settings.describe(),
                "fit_origins": self.origins[self.fit].tolist(), "scored_origins": self.origins[~self.fit].tolist()}


@dataclasses.dataclass
class ProbeScores:
    auc: float  # on the scored tiles' papyrus pixels
    ap: float  # average precision
    f05: float  # at `threshold`, chosen on the fitted tiles
    f05_chance: float  # calling every scored pixel ink
    threshold: float
    ink_fraction: float  # of the scored pixels
    scored_pixels: int
    prediction_nhw: np.ndarray = dataclasses.field(repr=False)  # (N scored, h, w) ink probability on the feature grid

    def scalars(self, suffix: str = "") -> dict[str, float]:
        """`probe__auc`… (TensorBoard `probe/auc`), with `suffix` (`_random`) for the baseline's."""
        values = {name: getattr(self, name) for name in SCORES}
        if not suffix:  # the chance levels (AUC's is 0.5): a map without skill has the ink fraction as its AP
            values.update(ap_chance=self.ink_fraction, f05_chance=self.f05_chance)
        return {f"probe__{name}{suffix}": float(value) for name, value in values.items()}


def assert_disjoint(first_n2: np.ndarray, second_m2: np.ndarray, tile_size: int) -> None:
    """Refuse two sets of tile origins (y, x) of which any two tiles, one from each, share a pixel: a probe scored on
    pixels it was fitted on would measure memory, not features."""
    offsets_nm2 = np.abs(first_n2[:, None, :] - second_m2[None, :, :])
    shared = np.argwhere((offsets_nm2 < tile_size).all(axis=2))
    if len(shared):
        first, second = shared[0]
        raise ValueError(f"the probe's fitted tile at {first_n2[first].tolist()} and scored tile at "
                         f"{second_m2[second].tolist()} share pixels ({tile_size}-pixel tiles)")


def choose_tiles(segment: Segment, tile_size: int, count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(N, 2) origins of up to `count` tiles of the segment's papyrus, on a grid at a stride of one tile, and (N,) bool:
    which of them the head is fitted on. Half are inked tiles where there are enough; each kind is split in turn between
    fitting and scoring, so both halves hold ink."""
    if segment.inklabels is None:
        raise SegmentError(f"segment {segment.name} has no ink labels for the ink probe")
    origins = tile_origins(segment, tile_size, tile_size, MOSTLY_PAPYRUS)
    ink = np.array([(segment.inklabels[y : y + tile_size, x : x + tile_size] > 0).mean() for y, x in origins])
    inked, bare = np.flatnonzero(ink >= INKED_TILE), np.flatnonzero(ink < INKED_TILE)
    if len(inked) < 2:
        raise SegmentError(f"segment {segment.name} has {len(inked)} {tile_size}-pixel tile(s) of papyrus with ink; the "
                           "ink probe needs 2 (one to fit, one to score)")
    rng = np.random.default_rng(seed)
    inked, bare = rng.permutation(inked), rng.permutation(bare)
    inked_count = max(2, min(len(inked), count - min(len(bare), count // 2)))
    chosen = [inked[:inked_count], bare[: max(0, min(len(bare), count - inked_count))]]
    fit = np.concatenate([np.arange(len(group)) % 2 == 0 for group in chosen])
    chosen_origins = origins[np.concatenate(chosen)]
    assert_disjoint(chosen_origins[fit], chosen_origins[~fit], tile_size)
    return chosen_origins, fit


def read_tiles(segment: Segment, settings: InputSettings, count: int, seed: int) -> ProbeTiles:
    """Choose the tiles (`choose_tiles`, as many as CACHE_BYTES holds) and read them once with the tile reader."""
    tile_bytes = 4 * settings.depth * settings.tile_size**2
    count = max(2, min(count, CACHE_BYTES // tile_bytes))
    origins, fit = choose_tiles(segment, settings.tile_size, count, seed)
    dataset = GridTileDataset(segment, settings, stride=settings.tile_size, origins=origins)
    items = [dataset[index] for index in range(len(dataset))]
    tile = settings.tile_size
    mask = np.stack([segment.mask[y : y + tile, x : x + tile] for y, x in origins]).astype(bool)
    return ProbeTiles(segment.name, settings, origins, fit, torch.stack([item["volume"] for item in items]),
                      np.stack([item["label"].numpy() > 0.5 for item in items]), mask)


def on_grid(pixels_ntt: np.ndarray, grid: int) -> np.ndarray:
    """(N, T, T) bool → (N, grid, grid) bool: set where at least half of a cell's pixels are."""
    count, tile = pixels_ntt.shape[:2]
    if tile % grid:
        raise ValueError(f"a {tile}-pixel tile does not divide into a {grid} × {grid} feature grid")
    factor = tile // grid
    return pixels_ntt.reshape(count, grid, factor, grid, factor).mean(axis=(2, 4)) >= 0.5


def fit_logistic_regression(features_pc: np.ndarray, labels_p: np.ndarray) -> tuple[np.ndarray, float]:
    """(C,) weights and the bias of an L2-regularised logistic regression (scikit-learn's objective at C =
    HEAD_INVERSE_REGULARISATION), fitted by full-batch L-BFGS from zero for HEAD_ITERATIONS at most: deterministic, a
    bounded cost (scikit-learn's lbfgs on these features ran to its iteration limit, several times slower)."""
    features = torch.from_numpy(np.ascontiguousarray(features_pc, dtype=np.float32))
    labels = torch.from_numpy(labels_p.astype(np.float32))
    weights, bias = torch.zeros(features.shape[1], requires_grad=True), torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.LBFGS([weights, bias], max_iter=HEAD_ITERATIONS, line_search_fn="strong_wolfe")
    penalty = 1 / (2 * HEAD_INVERSE_REGULARISATION * len(labels))

    def loss() -> torch.Tensor:
        optimizer.zero_grad()
        value = torch.nn.functional.binary_cross_entropy_with_logits(features @ weights + bias, labels)
        value = value + penalty * weights.pow(2).sum()
        value.backward()
        return value

    with torch.enable_grad():  # the caller may hold gradients off
        optimizer.step(loss)
    return weights.detach().numpy().astype(np.float64), float(bias.detach())


@torch.no_grad()
def features_of(method: methods.Method, encoder: torch.nn.Module, volumes: torch.Tensor, device: torch.device,
                amp: bool) -> np.ndarray:
    """(N, C, h, w) float32 probe features of tiles (N, 1, D, T, T)."""
    batches = []
    for start in range(0, len(volumes), FEATURE_BATCH):
        with dist.autocast(device, enabled=amp):
            features_bchw = method.probe_features(encoder, volumes[start : start + FEATURE_BATCH].to(device))
        batches.append(features_bchw.float().cpu().numpy())
    return np.concatenate(batches)


def probe_encoder(method: methods.Method, encoder: torch.nn.Module, tiles: ProbeTiles, device: torch.device,
                  seed: int, amp: bool = True) -> ProbeScores:
    """Fit the head on the fitted tiles' features and score the others. `encoder` in eval mode, on `device`."""
    fit_features_nchw = features_of(method, encoder, tiles.volumes[torch.from_numpy(tiles.fit)], device, amp)
    grid = fit_features_nchw.shape[-1]
    labels_nhw, mask_nhw = on_grid(tiles.labels, grid), on_grid(tiles.mask, grid)
    rng = np.random.default_rng(seed)
    rows, row_labels = [], []
    for features_chw, labels_hw, mask_hw in zip(fit_features_nchw, labels_nhw[tiles.fit], mask_nhw[tiles.fit]):
        pixels = np.flatnonzero(mask_hw.ravel())
        pixels = rng.choice(pixels, min(len(pixels), FIT_PIXELS_PER_TILE), replace=False)
        rows.append(features_chw.reshape(len(features_chw), -1)[:, pixels].T)  # (P, C)
        row_labels.append(labels_hw.ravel()[pixels])
    fit_pc, fit_labels = np.concatenate(rows), np.concatenate(row_labels)
    mean_c, std_c = fit_pc.mean(axis=0), fit_pc.std(axis=0) + 1e-6
    weights_c, bias = fit_logistic_regression((fit_pc - mean_c) / std_c, fit_labels)

    def ink_probability(features_pc: np.ndarray) -> np.ndarray:
        return 1 / (1 + np.exp(-(((features_pc - mean_c) / std_c) @ weights_c + bias)))

    threshold = best_threshold(ink_probability(fit_pc), fit_labels, THRESHOLDS)
    scored_features_nchw = features_of(method, encoder, tiles.volumes[torch.from_numpy(~tiles.fit)], device, amp)
    count, channels = scored_features_nchw.shape[:2]
    prediction_nhw = ink_probability(scored_features_nchw.transpose(0, 2, 3, 1).reshape(-1, channels))
    prediction_nhw = prediction_nhw.reshape(count, grid, grid)
    scored = mask_nhw[~tiles.fit]
    probabilities, labels = prediction_nhw[scored], labels_nhw[~tiles.fit][scored]
    return ProbeScores(auc=roc_auc(probabilities, labels), ap=average_precision(probabilities, labels),
                       f05=f05_at(probabilities, labels, threshold), f05_chance=all_ink_f05(float(labels.mean())),
                       threshold=threshold, ink_fraction=float(labels.mean()), scored_pixels=int(labels.size),
                       prediction_nhw=prediction_nhw)


def prediction_image(scores: ProbeScores, tiles: ProbeTiles) -> torch.Tensor:
    """(1, 2T, k·T) image: the probe's ink probability on the first k scored tiles above their labels."""
    shown = min(SHOWN_TILES, len(scores.prediction_nhw))
    tile = tiles.settings.tile_size
    factor = tile // scores.prediction_nhw.shape[-1]
    predictions = [np.kron(prediction, np.ones((factor, factor))) for prediction in scores.prediction_nhw[:shown]]
    labels = list(tiles.labels[~tiles.fit][:shown].astype(np.float64))
    image = np.concatenate([np.concatenate(predictions, axis=1), np.concatenate(labels, axis=1)], axis=0)
    return torch.from_numpy(image).float().unsqueeze(0)


class OnlineProbe:
    """What pretrain/main.py calls: `build` before anything is written (a user error surfaces first), `start` once the
    log is open (the baseline), `after_epoch` after every epoch (its scalars go into the epoch's log record)."""

    def __init__(self, args, tiles: ProbeTiles | None, note: str) -> None:
        self.args, self.tiles, self.note = args, tiles, note
        self.enabled = bool(args.probe_every) and note == ""
        self.baseline: dict[str, float] = {}
        self.encoder = None

    @classmethod
    def build(cls, args, segments: list[Segment]) -> "OnlineProbe":
        """The probe of `args` (pretrain.utils.arg_util.Args): on the probe segment, else on the first data_path
        segment with ink labels (off, with a note, if none has usable ones). Rank 0 reads the tiles."""
        if not args.probe_every:
            return cls(args, None, "off (probe_every 0)")
        if args.probe_segment:
            segment = open_segment(args.probe_segment, scroll=args.scroll, lru_bytes=args.lru_mb * 2**20)
            if segment.inklabels is None:
                raise SegmentError(f"probe_segment {args.probe_segment} has no ink labels for the ink probe")
        else:
            labelled = [segment for segment in segments if segment.inklabels is not None]
            if not labelled:
                return cls(args, None, "off (no data_path segment has ink labels; --probe_segment names one)")
            segment = labelled[0]
        probe = cls(args, None, "")
        if dist.is_master():
            try:
                probe = cls(args, read_tiles(segment, args.input_settings(), args.probe_tiles, args.probe_seed), "")
            except SegmentError as error:
                if args.probe_segment:
                    raise
                probe = cls(args, None, f"off ({error}; --probe_segment names another segment)")
        probe.enabled = dist.all_gather_object(probe.enabled)[0]  # rank 0's tiles decide; the others wait for it
        return probe

    def start(self, log, tensorboard) -> None:
        """The baseline: read back from log.jsonl for the same tiles, else probed on the random initialisation."""
        if not dist.is_master():
            return
        if not self.enabled:
            print(f"ink probe: {self.note}")
            return
        record = {**self.tiles.record(), "seed": self.args.seed}  # the seed: the random initialisation's
        try:
            earlier = [entry for entry in run_log.records(log.path.parent, BASELINE_EVENT)
                       if all(entry.get(key) == value for key, value in record.items())]
        except FileNotFoundError:
            earlier = []
        if earlier:
            self.baseline = {key: value for key, value in earlier[-1].items() if key.startswith("probe__")}
            source = "read back from log.jsonl"
        else:
            with torch.random.fork_rng(devices=[]):  # the run's own random draws stay as they were
                torch.manual_seed(self.args.seed)
                random_encoder = build_encoder(self.args.model)
            self.baseline = self.probe(random_encoder).scalars("_random")
            log.write(event=BASELINE_EVENT, **record, **self.baseline)
            source = "probed"
        fitted = int(self.tiles.fit.sum())
        print(f"ink probe: {fitted} + {len(self.tiles.fit) - fitted} tiles ({self.tiles.settings.tile_size} px) of "
              f"segment {self.tiles.segment_name} to fit and to score; the random initialisation's AUC "
              f"{self.baseline['probe__auc_random']:.3f} ({source})")

    def probe(self, encoder: torch.nn.Module) -> ProbeScores:
        """The scores of a dense encoder's weights, probed on a copy of this run's model on its device."""
        device = torch.device(self.args.device)
        if self.encoder is None:
            self.encoder = build_encoder(self.args.model).to(device).eval()
        self.encoder.load_state_dict(encoder.state_dict())
        method = methods.get(self.args.method)
        return probe_encoder(method, self.encoder, self.tiles, device, self.args.probe_seed, self.args.amp)

    def after_epoch(self, model: torch.nn.Module, epoch: int, global_step: int, tensorboard) -> dict[str, float]:
        """Probe the model's encoder after `epoch` (0-based) when due; its scalars and the baseline's, on rank 0."""
        due = (epoch + 1) % max(self.args.probe_every, 1) == 0 or epoch + 1 == self.args.ep
        if not self.enabled or not due:
            return {}
        scalars = {}
        if dist.is_master():
            scores = self.probe(methods.get(self.args.method).dense_encoder(model))
            scalars = {**scores.scalars(), **self.baseline}
            tensorboard.scalars(global_step, **scalars)
            tensorboard.image("probe/prediction_labels", prediction_image(scores, self.tiles), global_step)
        dist.barrier()
        return scalars
