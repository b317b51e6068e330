"""mansu: LLM unlearning that survives quantization."""
from . import files
from .data import Item, bundled_sets, load_bundled, load_items, split
from .errors import MansuError
from .evaluate import EvalResult, evaluate
from .models import EMBEDDED_MODEL, load_model

__version__ = "0.1.0"
