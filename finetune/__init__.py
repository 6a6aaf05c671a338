"""moetune's training side. Importing it quiets one message that no user can act on (see below)."""

import logging

# peft imports bitsandbytes whenever it is installed (peft/helpers.py), so every command imports it, even --help.
# On CPUs with AVX512-BF16 bitsandbytes then tries to fetch an optional kernel from the Hub through the `kernels`
# package and logs "Failed to load CPU gemm_4bit_forward from kernels-community" when it cannot; its own kernel
# works. moetune itself imports bitsandbytes only to quantize (finetune/modeling/expert_quant.py).
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

import warnings

# peft reads transformers' deprecated `model.is_gradient_checkpointing` when it wraps a model (peft_model.py); the
# FutureWarning names no setting of the user's or of moetune's (which uses activation_checkpointing).
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
