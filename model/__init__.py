"""Everything needed to use a trained chest X-ray classifier; imports nothing from Streamlit.

    >>> import model
    >>> clf = model.load_model()                 # assets/model, or $CXR_MODEL_DIR
    >>> clf.predict_proba(["xray.png"])          # calibrated P(pneumonia)
    >>> heat = clf.explain("xray.png")           # where the model looked, H x W in [0, 1]
    >>> rgb = model.overlay("xray.png", heat, opacity=0.4)
"""

from .artifact import ModelArtifactError, ModelMeta, load_artifact, read_meta, save_artifact
from .classifier import CAM_LABELS, CAM_METHODS, Analysis, Classifier, default_model_dir, load_model, overlay
from .preprocessing import (
    MAX_PIXELS,
    InvalidImageError,
    decode_image,
    load_square,
    normalize,
    preprocess,
    resize_square,
)
from .registry import PretrainedWeightsUnavailable, cam_target_layer, create_model, get_spec, list_models

__all__ = [
    "Analysis", "CAM_LABELS", "CAM_METHODS", "Classifier", "InvalidImageError", "MAX_PIXELS",
    "ModelArtifactError", "ModelMeta", "PretrainedWeightsUnavailable", "cam_target_layer",
    "create_model", "decode_image", "default_model_dir", "get_spec", "list_models", "load_artifact",
    "load_model", "load_square", "normalize", "overlay", "preprocess", "read_meta", "resize_square",
    "save_artifact",
]
