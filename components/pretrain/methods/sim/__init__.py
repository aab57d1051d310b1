"""SIM, Siamese Image Modeling (Tao et al., CVPR 2023): a masked view A predicts view B's dense tokens on a plain ViT.

Block masks (``masking``), B's positions in A (``positions``), UniGrad (``losses``), the model (``model``) and the
method the engine drives (``method``, ``pretrain.method: sim``).
"""
