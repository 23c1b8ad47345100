__version__ = "0.1.0"

# First of all, before any module of ours imports transformers, PEFT or bitsandbytes: no code from the hub is run
# (bitsandbytes asks the `kernels` package for a hub kernel when it is imported on a CPU with AVX512-BF16). See
# nbs/00b_offline.ipynb; TYPHOON_NB_HUB_KERNELS=1 allows it.
from .offline import guard_hub_kernels as _guard_hub_kernels
_guard_hub_kernels()
