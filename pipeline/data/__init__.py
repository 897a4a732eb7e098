"""Data stage: MSD Task01 (real or synthetic) -> checked subjects -> patient-level split -> slice cache."""

from pipeline.common import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(
    __name__,
    dataset="load_subjects PreprocessConfig dataset_split_file dataset_fingerprint",
    prepare="prepare_data PreparedData",
    split="make_split",
    transforms="preprocess_transforms",
    slice_cache="SliceDataset LabelledSliceDataset",
    synth="generate_dataset HiddenTest",
    variety="Variety Domain PRESETS load_settings",
)
