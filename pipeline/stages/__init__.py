"""One module per stage (prepare, reference, train, generate, evaluate), each `run(cfg) -> Manifest`."""
