"""FiSeCLIP as an anomalib model: `Engine().test(FiseclipAnomalib(config), datamodule)` on any anomalib image
datamodule, with anomalib's own metrics, thresholds and visualisation.

Each batch anomalib hands the model is scored by our `Detector` as one batch of `fiseclip run`: the batch is the
mutual reference set (so the datamodule's `eval_batch_size` is the method's batch size), the images are read from
the batch's `image_path` with the encoder's own preprocessing, and the maps come back at the encoder's input
size, where a pre-processor that resizes the batch to that size puts anomalib's ground-truth masks. With the same
images in the same batches, anomalib's image and pixel AUROC equal `fiseclip run`'s (tests/test_anomalib_model.py).
RsCIN re-scores a whole category after its batches, which anomalib's batch-by-batch loop cannot express: a config
that asks for it is refused. Scores are not min-max normalised by default (anomalib's metrics see our scores, as
`fiseclip run`'s do); thresholds are anomalib's adaptive ones, computed in the validation pass `Engine.test` runs
first for zero-shot models. anomalib (the extra `fiseclip[anomalib]`) is imported by this module only.
"""
from __future__ import annotations

import torch
from torchvision.transforms.v2 import Resize

from fiseclip_lib.config import FiseConfig
from fiseclip_lib.core.detector import Detector
from fiseclip_lib.errors import FiseclipError

try:
    from anomalib import LearningType
    from anomalib.models.components import AnomalibModule
    from anomalib.post_processing import PostProcessor
    from anomalib.pre_processing import PreProcessor
    from anomalib.visualization import ImageVisualizer
except ImportError as e:  # the extra is missing: say how to install it, in one line
    raise FiseclipError(f"FiseclipAnomalib needs anomalib, which is not installed here ({e}); "
                        f"pip install 'fiseclip[anomalib]'") from None


class FiseclipAnomalib(AnomalibModule):
    """A zero-shot anomalib model that scores each test batch with FiSeCLIP (or any method of the harness).

    Args:
        config: the method's settings (`FiseConfig`, or a mapping of its fields); RsCIN must be off.
        class_name: the object's name in the prompts; default: the datamodule's category, else "object".
        detector: a `Detector` to use instead of building one from `config` (e.g. one that is already loaded).
        pre_processor, post_processor, evaluator, visualizer: anomalib's components (True: this model's defaults:
            resize to the encoder's input size; no normalisation, adaptive thresholds; anomalib's metrics;
            images with the anomaly map scaled per image).
    """

    def __init__(self, config: FiseConfig | dict | None = None, class_name: str | None = None,
                 detector: Detector | None = None, pre_processor=True, post_processor=True, evaluator=True,
                 visualizer=True) -> None:
        config = detector.config if detector is not None else (
            FiseConfig.from_dict(config) if isinstance(config, dict) else (config or FiseConfig()))
        config = config.validate()
        if config.use_rscin:
            raise FiseclipError(f"method {config.method} re-scores with RsCIN over a whole category, which anomalib's "
                                f"batch-by-batch test cannot do; pass rscin=False (or use fiseclip run)")
        if config.spec.category_pool and config.musc_pool == "category":
            raise FiseclipError(f"method {config.method} scores a whole category as one batch (musc_pool=category), "
                                f"anomalib hands over one batch at a time; pass musc_pool='batch' (and the "
                                f"datamodule's eval_batch_size as the batch), or use fiseclip run")
        self._config = config  # before super().__init__: configure_pre_processor reads the input size
        super().__init__(pre_processor=pre_processor, post_processor=post_processor, evaluator=evaluator,
                         visualizer=visualizer)
        self.class_name = class_name
        self._detector = detector

    @property
    def detector(self) -> Detector:
        """The Detector, built on first use (loading the encoder is the slow part)."""
        if self._detector is None:
            self._detector = Detector(self._config)
        return self._detector

    def configure_pre_processor(self, image_size: tuple[int, int] | None = None) -> PreProcessor:
        """Resize batches (and anomalib's masks, nearest) to the encoder's input size, where our maps are.

        Args:
            image_size: ignored; the size is the config's input size.
        Returns:
            anomalib's PreProcessor with that resize.
        """
        side = self._config.input_size
        return PreProcessor(transform=Resize((side, side), antialias=True))

    @staticmethod
    def configure_post_processor() -> PostProcessor:
        """anomalib's PostProcessor without min-max normalisation: its metrics see our scores."""
        return PostProcessor(enable_normalization=False)

    @classmethod
    def configure_visualizer(cls) -> ImageVisualizer:
        """anomalib's ImageVisualizer, the anomaly map scaled to its own range (our maps are not in [0, 1])."""
        scaled = {"colormap": True, "normalize": True}
        return ImageVisualizer(fields_config={"anomaly_map": scaled}, overlay_fields_config={"anomaly_map": scaled})

    def _class_name(self) -> str:
        if self.class_name is None:
            module = getattr(getattr(self, "_trainer", None), "datamodule", None)
            self.class_name = getattr(module, "category", None) or "object"
        return self.class_name

    def _score(self, batch):
        """Score one anomalib batch as one mutual-reference batch; its predictions merged into the batch."""
        paths = batch.image_path
        if paths is None or len(paths) == 0:
            raise FiseclipError("an anomalib batch without image_path cannot be scored: FiseclipAnomalib reads the "
                                "images itself, with the encoder's preprocessing")
        result = self.detector.score([str(p) for p in paths], self._class_name())
        device = batch.image.device if isinstance(batch.image, torch.Tensor) else torch.device("cpu")
        maps = torch.from_numpy(result.maps).float().to(device)
        if isinstance(batch.image, torch.Tensor) and maps.shape[-2:] != batch.image.shape[-2:]:
            # a custom pre-processor of another size: anomalib evaluates at the batch's size
            maps = torch.nn.functional.interpolate(maps[:, None], size=batch.image.shape[-2:], mode="bilinear",
                                                   align_corners=False)[:, 0]
        return batch.update(pred_score=torch.from_numpy(result.scores).float().to(device), anomaly_map=maps)

    def validation_step(self, batch, *args, **kwargs):
        """Score a validation batch (anomalib computes its thresholds from these)."""
        del args, kwargs
        return self._score(batch)

    def test_step(self, batch, batch_idx: int, *args, **kwargs):
        """Score a test batch."""
        del batch_idx, args, kwargs
        return self._score(batch)

    def predict_step(self, batch, batch_idx: int, dataloader_idx: int = 0):
        """Score a predict batch."""
        del batch_idx, dataloader_idx
        return self._score(batch)

    @staticmethod
    def configure_optimizers() -> None:
        """Nothing is trained."""
        return None

    @property
    def trainer_arguments(self) -> dict:
        """No special trainer arguments."""
        return {}

    @property
    def learning_type(self) -> LearningType:
        """Zero-shot: no training images are used."""
        return LearningType.ZERO_SHOT
