"""Loading base models and describing their inputs."""

from peftc.loaders.inputs import DimSpec, InputSignature, TensorInput, parse_inputs
from peftc.loaders.models import LoadedModel, load_model

__all__ = ["DimSpec", "InputSignature", "LoadedModel", "TensorInput", "load_model", "parse_inputs"]
