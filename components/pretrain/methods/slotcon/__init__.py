"""SlotCon (Wen et al., NeurIPS 2022): semantic grouping by learned prototypes, slot-level contrast; its model
(:mod:`~components.pretrain.methods.slotcon.model`), losses, overlap alignment and the engine method."""
from components.pretrain.methods.slotcon.align import align_scores
from components.pretrain.methods.slotcon.model import SlotCon, model_kwargs_from_config

__all__ = ["SlotCon", "align_scores", "model_kwargs_from_config"]
