"""Gates that are not sequence mixers: MoE routers, CNN attention gates, feature-selection gates."""
