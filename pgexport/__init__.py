"""pgexport: PaliGemma from PyTorch to production runtimes."""
