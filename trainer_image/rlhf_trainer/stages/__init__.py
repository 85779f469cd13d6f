"""One module per pipeline stage; each exposes ``run(config, workspace) -> dict`` of metrics."""
