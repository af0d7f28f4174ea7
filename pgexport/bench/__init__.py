"""`pgexport bench`: each backend measured in its own process (`run` -> `worker`), timing and
memory helpers (`measure`), and the report (`report`). Only the CLI imports this package."""
