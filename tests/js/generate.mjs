// Greedy generation with transformers.js on a local pgexport export (--layout transformers.js).
//   node generate.mjs '{"model": "/path/export", "dtype": "q4", "images": ["a.png"], "prompts": ["caption en"], "max_new_tokens": 8}'
// Prints one JSON line: {"input_ids": [[...]], "attention_mask": [[...]], "new_tokens": [[...]], ...}, with
// the seconds taken to load the model and by each of `repeats` (default 1) generations.
import path from 'node:path';
import { env, AutoProcessor, PaliGemmaForConditionalGeneration, RawImage } from '@huggingface/transformers';

const args = JSON.parse(process.argv[2]);
env.allowRemoteModels = false;  // offline: only the export folder is read
env.localModelPath = path.dirname(path.resolve(args.model)) + '/';
const id = path.basename(path.resolve(args.model));

const loadStart = performance.now();
const processor = await AutoProcessor.from_pretrained(id);
const model = await PaliGemmaForConditionalGeneration.from_pretrained(id, { dtype: args.dtype, device: 'cpu' });
const loadSeconds = (performance.now() - loadStart) / 1000;
const images = await Promise.all(args.images.map((p) => RawImage.read(p)));
// "<image>" in the text: the processor then expands each to the image's tokens (without it, a
// batch would get the tokens of every image in every row).
const texts = args.prompts.map((p) => '<image>' + p);
const inputs = await processor(images, texts, { padding: true });
const seconds = [];
let sequences;
for (let i = 0; i < (args.repeats ?? 1); ++i) {
  const start = performance.now();
  sequences = await model.generate({ ...inputs, max_new_tokens: args.max_new_tokens, do_sample: false });
  seconds.push((performance.now() - start) / 1000);
}
const promptLength = inputs.input_ids.dims[1];
const rows = sequences.tolist().map((row) => row.slice(promptLength).map(Number));
console.log(JSON.stringify({
  input_ids: inputs.input_ids.tolist().map((r) => r.map(Number)),
  attention_mask: inputs.attention_mask.tolist().map((r) => r.map(Number)),
  pixel_values_sum: Array.from(inputs.pixel_values.data).reduce((a, b) => a + b, 0),
  new_tokens: rows,
  load_seconds: loadSeconds,
  seconds,
}));
