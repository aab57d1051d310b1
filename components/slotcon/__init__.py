"""SlotCon model, losses and two-view augmentation (issue 4, model half)."""
from components.slotcon.align import align_scores
from components.slotcon.augment import TwoViewAugment
from components.slotcon.model import SlotCon, model_kwargs_from_config
from components.slotcon.transforms import collate_crop_params, sample_two_crops

__all__ = [
    "SlotCon",
    "TwoViewAugment",
    "align_scores",
    "collate_crop_params",
    "model_kwargs_from_config",
    "sample_two_crops",
]
