"""Models: loading checkpoints and tiny models, finding routers and experts, LoRA adapters by role, NF4 experts and
the LM-head kernel. Knows nothing of trainers or stages."""
