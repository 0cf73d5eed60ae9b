"""simu's library: no Prefect, one job per module (see docs/design.md)."""

import logging

# torchao (the quantization attack's library) is imported by transformers in every process once it is
# installed; on a CPU machine it logs that its bundled CUDA kernels failed to load, and torch 2.13 warns
# once per enum it registers with torch's pytree. simu uses only torchao's pure-PyTorch path: keep errors.
logging.getLogger("torchao").setLevel(logging.ERROR)
logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
