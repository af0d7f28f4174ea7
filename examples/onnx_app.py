"""Run a pgexport ONNX folder with onnxruntime, numpy, tokenizers and pillow only (no pgexport).

    python examples/onnx_app.py EXPORT_DIR IMAGE [PROMPT] [--max-new-tokens N]

Everything this program knows about the model comes from the folder: `pgexport.json` (graph
files, KV-cache geometry, image settings, special token ids), the tokenizer and the three graphs.
It is the export contract in ~100 lines: greedy decoding of one image and prompt.
"""

import argparse
import json
import os
import sys

import numpy as np
import onnxruntime as ort
from PIL import Image
from tokenizers import Tokenizer


def preprocess(path, m):
    """RGB, bicubic resize to the square input size, /255, (x - mean) / std, channels first."""
    image = Image.open(path)
    if "A" in image.getbands() or image.info.get("transparency") is not None:  # transparency onto white
        image = Image.alpha_composite(Image.new("RGBA", image.size, (255, 255, 255, 255)), image.convert("RGBA"))
    size = m["image_size"]
    pixels = np.asarray(image.convert("RGB").resize((size, size), resample=m.get("image_resample", 3)))
    x = (pixels.astype(np.float64) * (1 / 255)).astype(np.float32)
    x = (x - np.array(m["image_mean"], np.float32)) / np.array(m["image_std"], np.float32)
    return x.transpose(2, 0, 1)[None]  # [1, 3, size, size]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("export_dir")
    parser.add_argument("image")
    parser.add_argument("prompt", nargs="?", default="caption en")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args()

    folder = args.export_dir
    with open(os.path.join(folder, "pgexport.json")) as f:
        m = json.load(f)
    if m["format_version"] != 1:
        sys.exit(f"{folder}: format_version {m['format_version']} is not supported by this example")
    tok = Tokenizer.from_file(os.path.join(folder, m["tokenizer"]))  # tokenizer.json

    def session(key):
        options = ort.SessionOptions()
        options.log_severity_level = 3
        return ort.InferenceSession(os.path.join(folder, m["graphs"][key]), options, providers=["CPUExecutionProvider"])

    vision, prefill, decode = session("vision_encoder"), session("prefill"), session("decode")
    past_names = [f"past_key_values.{i}.{kv}" for i in range(m["num_layers"]) for kv in ("key", "value")]

    # The prompt: <image> x N, <bos>, the prompt and "\n" (tokenized without added specials).
    text_ids = tok.encode(args.prompt + "\n", add_special_tokens=False).ids
    ids = np.array([[m["image_token_id"]] * m["num_image_tokens"] + [m["bos_token_id"]] + text_ids], np.int64)
    mask = np.ones_like(ids)

    # The graphs say which float type they take (fp32 or fp16 exports).
    pixel_type = np.float16 if vision.get_inputs()[0].type == "tensor(float16)" else np.float32
    (features,) = vision.run(None, {"pixel_values": preprocess(args.image, m).astype(pixel_type)})
    logits, *past = prefill.run(None, {"input_ids": ids, "image_features": features, "attention_mask": mask})

    new_ids = []
    for step in range(args.max_new_tokens):
        token = int(np.argmax(logits[0]))
        new_ids.append(token)
        if token == m["eos_token_id"] or step == args.max_new_tokens - 1:
            break
        mask = np.concatenate([mask, np.ones((1, 1), np.int64)], axis=1)  # one more real slot
        feed = {"input_ids": np.array([[token]], np.int64), "attention_mask": mask, **dict(zip(past_names, past))}
        logits, *past = decode.run(None, feed)
    print(tok.decode(new_ids, skip_special_tokens=True))


if __name__ == "__main__":
    main()
