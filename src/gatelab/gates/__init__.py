"""Gates that are not sequence mixers: MoE routers and the MoE MLP (``gates/moe/``), vision feature-map gates
(``gates/vision/``). They register in the registry's ``"gate"`` family, which the sequence-mixer drivers
skip; the registry imports each sub-package, which registers its own gates."""
