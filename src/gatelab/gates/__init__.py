"""Gates that are not sequence mixers: MoE routers, feature-map gates, gated pooling."""
