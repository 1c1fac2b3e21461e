"""Drop-in patches that make existing trainers compute with rlhf-fast's kernels.

`rlhf_fast.integrations.trl`: TRL's fused LM head (DPO, GRPO, RLOO, KTO, SFT trainers).
"""
