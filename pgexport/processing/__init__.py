"""Torch-free processing: prompts and images in, token ids and pixels out, text and boxes back.

    tokenizer.py    PaliGemma's tokenizer: load a real one, build the small stand-in, save
    image.py        image loading (with the checks a service needs) and SigLIP preprocessing
    processor.py    `PaliGemmaProcessor`: the prompt format (image tokens, bos, "\\n") and batching
    detection.py    `<locNNNN>` boxes: parse, encode, draw
"""
