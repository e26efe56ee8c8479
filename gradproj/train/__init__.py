"""Training from TOML run specs: spec, model, data, loop, per-layer updates, checkpoints,
metrics and the `gradproj` command line. See examples/tiny.toml."""
from .model import MODEL_PRESETS, Llama, ModelConfig, build_model, model_config
from .spec import RunSpec, load_spec, spec_from_dict

__all__ = ["Llama", "MODEL_PRESETS", "ModelConfig", "RunSpec", "build_model", "load_spec",
           "model_config", "spec_from_dict"]
