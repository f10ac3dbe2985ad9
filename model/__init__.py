"""Everything needed to use a trained chest X-ray classifier; imports nothing from Streamlit.

    >>> import model
    >>> clf = model.load_model()                 # assets/model, or $CXR_MODEL_DIR
    >>> clf.predict_proba(["xray.png"])          # calibrated P(pneumonia)
    >>> [p.check.flagged for p in clf.predict(["xray.png"])]   # the input gate, same forward pass
    >>> heat = clf.explain("xray.png")           # where the model looked, H x W in [0, 1]
    >>> rgb = model.overlay("xray.png", heat, opacity=0.4)

Names are resolved lazily (PEP 562), so ``import model.decision`` or ``from model import decide``
does not pay for importing torch.
"""

from importlib import import_module

_EXPORTS = {
    "artifact": ["ModelArtifactError", "ModelMeta", "load_artifact", "read_meta", "save_artifact"],
    "classifier": ["CAM_LABELS", "CAM_METHODS", "DEFAULT_CAM_METHOD", "Analysis", "Classifier", "Prediction", "default_model_dir",
                   "load_model", "overlay"],
    "decision": ["DEFAULT_BAND", "DISCLAIMER", "NOT_ASSESSED", "at_prevalence", "decide"],
    "exports": ["EXPORTS"],
    "gate": ["InputCheck"],
    "preprocessing": ["MAX_PIXELS", "DecodedImage", "InvalidImageError", "decode", "decode_image", "load_square", "normalize", "preprocess",
                      "resize_square"],
    "registry": ["PretrainedWeightsUnavailable", "cam_target_layer", "create_model", "get_spec", "list_models"],
    "stability": ["STABLE_CHANGE", "ExportStability", "export_stability"],
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        value = getattr(import_module(f".{_WHERE[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'model' has no attribute {name!r}")


def __dir__():
    return __all__
