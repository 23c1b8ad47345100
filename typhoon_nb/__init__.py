__version__ = "0.1.0"

import logging as _logging
# bitsandbytes, when imported on a CPU with AVX512-BF16, tries to fetch an optional 4-bit inference kernel from the
# hub (only if the `kernels` package is installed) and otherwise warns once. We do not use that kernel: keep the
# warning out of notebooks and run logs (errors from that module still show).
_logging.getLogger('bitsandbytes.backends.cpu.ops').setLevel(_logging.ERROR)
