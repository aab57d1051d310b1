"""MoCo v2, the image-level baseline: model + losses (pure, collectives passed in) and the engine method."""
from components.pretrain.methods.mocov2.losses import enqueue, info_nce_queue, shuffle_plan
from components.pretrain.methods.mocov2.model import MoCoV2, model_kwargs_from_params

__all__ = ["MoCoV2", "enqueue", "info_nce_queue", "model_kwargs_from_params", "shuffle_plan"]
