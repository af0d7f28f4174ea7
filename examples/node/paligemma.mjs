// Run a pgexport ONNX folder with onnxruntime-node and @huggingface/tokenizers only: the Node
// counterpart of examples/onnx_app.py, driven by the folder's pgexport.json.
//
//   node paligemma.mjs EXPORT_DIR IMAGE.png ["caption en"] [--max-new-tokens N] [--json]
//
// The text streams to stdout as the tokens arrive; --json prints {ids, text, detections} instead.

import { readFile } from "node:fs/promises";
import path from "node:path";
import { parseArgs } from "node:util";

import { Tokenizer } from "@huggingface/tokenizers";
import * as ort from "onnxruntime-node";

import { PaliGemma, parseDetections, preprocess } from "../web/pgexport.mjs";
import { decodePng } from "./png.mjs";

const USAGE = "usage: node paligemma.mjs EXPORT_DIR IMAGE.png [PROMPT] [--max-new-tokens N] [--json]";
function usage(message) {
  console.error(message ? `error: ${message}\n${USAGE}` : USAGE);
  process.exit(2);
}

let options, positionals;
try {
  ({ values: options, positionals } = parseArgs({
    allowPositionals: true,
    options: { "max-new-tokens": { type: "string", default: "32" }, json: { type: "boolean", default: false } },
  }));
} catch (error) {
  usage(error.message);
}
const [folder, imagePath, prompt = "caption en"] = positionals;
if (!folder || !imagePath) usage();
const maxNewTokens = Number(options["max-new-tokens"]);
if (!Number.isInteger(maxNewTokens) || maxNewTokens < 1) usage(`--max-new-tokens ${options["max-new-tokens"]} is not a positive integer`);

async function main() {
  const model = await PaliGemma.load({
    ort,
    Tokenizer,
    readJson: async (file) => JSON.parse(await readFile(path.join(folder, file), "utf8")),
    // From a path, ONNX Runtime finds the graph's external data next to it.
    createSession: (file) => ort.InferenceSession.create(path.join(folder, file), { logSeverityLevel: 3 }),
  });
  const image = decodePng(await readFile(imagePath));
  const pixels = preprocess(image, model.manifest);
  if (options.json) {
    const ids = [];
    for await (const id of model.generateIds(pixels, prompt, maxNewTokens)) ids.push(id);
    const text = model.tokenizer.decode(ids, { skip_special_tokens: true });
    console.log(JSON.stringify({ ids, text, detections: parseDetections(text, image.width, image.height) }));
  } else {
    for await (const piece of model.generate(pixels, prompt, maxNewTokens)) process.stdout.write(piece);
    process.stdout.write("\n");
  }
  await model.release();
}

main().catch((error) => {
  console.error(`error: ${error.message}`);
  process.exit(1);
});
