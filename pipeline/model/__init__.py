"""Model stage: noise (Gaussian, simplex, coarse), the DiffusionModelUNet and scheduler, training and checkpoints."""

from pipeline.common import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(
    __name__,
    noise="make_noise NoiseGenerator",
    network="diffusion_unet make_scheduler",
    train="NoisePrepareBatch slice_loader",
    handlers="save_model",
    checkpoint="load_checkpoint",
    guided_train="GuidedPrepareBatch ClassConditionalInferer",
    model_card="check_card",
)
