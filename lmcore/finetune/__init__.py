"""Fine-tuning: SFT with assistant-only loss masking, sequence classification, LoRA (see the submodules)."""
