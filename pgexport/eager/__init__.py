"""The eager PyTorch side of the application: loading checkpoints into `pgexport.models`,
generating with them (`generate`), and optimum-quanto weights (`quanto`). Needs the `export` extra."""
