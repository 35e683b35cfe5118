"""KV-cache experiments on the lab's LMs: fine-tune gates (and their controls), decode under a policy and
budget, and the KV rows of ``gatelab compare --kv-cache`` / ``gatelab cache``. The policies themselves are
library code in ``gatelab.cache``."""
