"""FLASH in Hugging Face transformers: `FLASHConfig`, `FLASHModel`, `FLASHForCausalLM` and
`FLASHCache`, registered with AutoConfig, AutoModel and AutoModelForCausalLM (model_type "flash")
when this module is imported, so `AutoModelForCausalLM.from_pretrained(path)` loads a saved
FLASH model in any process that has run `import flash_kernels.hf`.

An optional part of the package: `pip install "flash-kernels[hf]"` (transformers, safetensors
and accelerate, which Trainer needs). `import flash_kernels` never imports transformers.
"""

try:
    import transformers
except ImportError as error:
    raise ImportError(
        "flash_kernels.hf needs Hugging Face transformers: install the 'hf' extra, "
        'pip install "flash-kernels[hf]" (in a checkout: pip install -e ".[hf]")'
    ) from error

from .cache import FLASHCache
from .configuration import FLASHConfig
from .modeling import FLASHForCausalLM, FLASHModel, FLASHPreTrainedModel

transformers.AutoConfig.register(FLASHConfig.model_type, FLASHConfig, exist_ok=True)
transformers.AutoModel.register(FLASHConfig, FLASHModel, exist_ok=True)
transformers.AutoModelForCausalLM.register(FLASHConfig, FLASHForCausalLM, exist_ok=True)

__all__ = ["FLASHCache", "FLASHConfig", "FLASHForCausalLM", "FLASHModel", "FLASHPreTrainedModel"]
