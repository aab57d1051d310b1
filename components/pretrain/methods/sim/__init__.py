"""SIM, Siamese Image Modeling (Tao et al., CVPR 2023): a masked view A predicts view B's dense tokens on a plain ViT.

- :mod:`components.pretrain.methods.sim.masking`: BEiT block-wise mask of view A (fixed count), drawn in the loader workers;
- :mod:`components.pretrain.methods.sim.positions`: view B's patches in view A's frame, sin-cos embeddings;
- :mod:`components.pretrain.methods.sim.losses`: UniGrad (correlation matrix all-reduced over ranks), global + dense terms;
- :mod:`components.pretrain.methods.sim.model`: online ViT + projector/predictor, EMA target;
- :mod:`components.pretrain.methods.sim.method`: the method object the training engine drives (``pretrain.method: sim``).
"""
