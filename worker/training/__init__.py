"""Fine-tuning on the export (``egm-assist export``): the closed loop's GPU side.

* :mod:`.sft_data` reads the SFT JSONL as Qwen's qwen-vl-finetune reads it and encodes it once;
* :mod:`.sft` trains with transformers' ``Trainer`` within a wall-clock budget;
* :mod:`.grpo` runs TRL's ``GRPOTrainer`` on the GRPO parquet with the exported reward;
* :mod:`.heldout` measures a model on held-out scenes through the project's transformers engine.

Everything here imports torch and transformers (and TRL for GRPO) lazily or at module level;
only ``egm.worker`` may do that. See docs/loop.md.
"""
