"""Models from local dirs, URIs and the hub (resolve, cache, fingerprint), the vLLM engine, rewards, tiny models."""
