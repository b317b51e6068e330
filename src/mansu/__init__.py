"""mansu: LLM unlearning that survives quantization.

    model, tokenizer = mansu.load_model()                    # the embedded SmolLM2-135M, or any HF causal LM
    forget, retain = mansu.split(mansu.load_bundled("capitals"), 10)
    result = mansu.unlearn(model, tokenizer, forget, retain, mansu.MansuConfig())   # edits in place
"""
from . import files
from .attribution import Circuit, CircuitConfig, attribute, attribute_circuit
from .circuit_divergence import CADResult, cad
from .data import Item, bundled_sets, load_bundled, load_items, split, train_on_paraphrases
from .errors import MansuError, MansuWarning
from .evaluation import EvalResult, answer_logprob, evaluate
from .fisher import BoundConfig, BoundedUpdate, Fisher, FisherConfig, bound_update, diagonal_fisher
from .floor import FloorStats, apply_floor_, floor_update
from .hardening import HardenConfig, harden
from .lmeval import export_lmeval
from .methods import BaselineConfig
from .models import EMBEDDED_MODEL, load_model, save_model
from .pipeline import MansuConfig, UnlearnResult, unlearn
from .probes import RelearnResult, generation_recall, relearn_attack
from .projection import ProjectionConfig, Projector, null_space_projector
from .quant import (BinGeometry, Certificate, FormatCheck, bin_geometry, check, evaluate_formats, fake_quantize,
                    quantized_copy)
from .tracking import log_rounds

__version__ = "0.1.0"

__all__ = [
    # verbs
    "load_model", "save_model", "evaluate", "unlearn", "harden", "check", "cad", "attribute_circuit",
    "export_lmeval",
    # configs
    "MansuConfig", "HardenConfig", "BaselineConfig", "CircuitConfig", "FisherConfig", "BoundConfig", "ProjectionConfig",
    # results
    "UnlearnResult", "EvalResult", "Certificate", "FormatCheck", "Circuit", "CADResult", "Fisher", "Projector",
    "RelearnResult", "FloorStats", "BoundedUpdate", "BinGeometry",
    # building blocks
    "Item", "load_items", "load_bundled", "bundled_sets", "split", "train_on_paraphrases", "answer_logprob",
    "attribute", "diagonal_fisher", "bound_update", "null_space_projector", "floor_update", "apply_floor_",
    "bin_geometry", "fake_quantize", "quantized_copy", "evaluate_formats", "generation_recall", "relearn_attack",
    "EMBEDDED_MODEL", "MansuError", "MansuWarning",
    "log_rounds", "files",
]
