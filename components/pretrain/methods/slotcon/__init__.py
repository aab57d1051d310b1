"""SlotCon model, losses and two-view augmentation (issue 4, model half)."""
from components.pretrain.methods.slotcon.align import align_scores
from components.pretrain.augment import TwoViewAugment
from components.pretrain.methods.slotcon.model import SlotCon, model_kwargs_from_config
from components.pretrain.crops import collate_crop_params, sample_two_crops

__all__ = [
    "SlotCon",
    "TwoViewAugment",
    "align_scores",
    "collate_crop_params",
    "model_kwargs_from_config",
    "sample_two_crops",
]
