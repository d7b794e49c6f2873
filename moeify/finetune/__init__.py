"""`moeify finetune`: a brief repair of a split MoE, distilled from the dense model it came from.

Stage 1 fits each router layer by layer (no backpropagation through the model); stage 2 distils the
whole MoE toward the teacher's logits. The output is a standard checkpoint in the input's layout.
"""

from moeify.finetune.run import FinetuneOptions, finetune

__all__ = ["FinetuneOptions", "finetune"]
