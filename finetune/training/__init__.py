"""Training support for the SFT and DPO stages: trainer configs, packed batches, the scored LM head, checkpoints,
resume, balancing and saving."""
