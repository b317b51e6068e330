"""mansu: LLM unlearning that survives quantization.

    model, tokenizer = mansu.load_model()                    # the embedded SmolLM2-135M, or any HF causal LM
    forget, retain = mansu.split(mansu.load_bundled("capitals"), 10)
    result = mansu.unlearn(model, tokenizer, forget, retain, mansu.MansuConfig())   # edits in place
"""
from . import files
from .attribution import Circuit, CircuitConfig, attribute, attribute_circuit
from .cad import CADResult, cad
from .data import Item, bundled_sets, load_bundled, load_items, split
from .errors import MansuError
from .evaluate import EvalResult, evaluate
from .fisher import BoundConfig, Fisher, FisherConfig, bound_update, diagonal_fisher
from .floor import apply_floor_, floor_update
from .harden import HardenConfig, harden
from .methods import BaselineConfig
from .models import EMBEDDED_MODEL, load_model, save_model
from .pipeline import MansuConfig, UnlearnResult, unlearn
from .probes import RelearnResult, generation_recall, relearn_attack
from .projection import ProjectionConfig, Projector, null_space_projector
from .quant import Certificate, bin_geometry, check, evaluate_formats, fake_quantize, quantized_copy

__version__ = "0.1.0"

__all__ = [
    # verbs
    "load_model", "save_model", "evaluate", "unlearn", "harden", "check", "cad", "attribute_circuit",
    # configs
    "MansuConfig", "HardenConfig", "BaselineConfig", "CircuitConfig", "FisherConfig", "BoundConfig", "ProjectionConfig",
    # results
    "UnlearnResult", "EvalResult", "Certificate", "Circuit", "CADResult", "Fisher", "Projector", "RelearnResult",
    # building blocks
    "Item", "load_items", "load_bundled", "bundled_sets", "split", "attribute", "diagonal_fisher",
    "bound_update", "null_space_projector", "floor_update", "apply_floor_", "bin_geometry", "fake_quantize",
    "quantized_copy", "evaluate_formats", "generation_recall", "relearn_attack", "EMBEDDED_MODEL", "MansuError",
    "files",
]
