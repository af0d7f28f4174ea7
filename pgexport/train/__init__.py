"""Training: the synthetic shapes data (`dataset`), fine-tuning (`finetune`), the demo model's
architecture (`demo`) and task accuracy on labelled data (`evaluate`). Needs the `export` extra."""
