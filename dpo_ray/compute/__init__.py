"""How the policy's log-probs are computed: batching modes, padding-free layouts, attention kernels, the fused head."""
