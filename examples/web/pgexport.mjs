// Run a pgexport ONNX folder from JavaScript: the export contract (docs/onnx-export.md) in one
// module shared by the Node example (onnxruntime-node) and the web page (onnxruntime-web).
//
//   const model = await PaliGemma.load({ ort, Tokenizer, readJson, createSession });
//   const pixels = preprocess(rgba, model.manifest);          // RGBA bytes -> [1, 3, S, S]
//   for await (const piece of model.generate(pixels, "caption en")) out += piece;
//
// Everything the code knows about the model comes from pgexport.json. The caller injects the
// ONNX Runtime flavour (`ort`), the tokenizer class (@huggingface/tokenizers) and how files are
// read (the file system in Node, fetch in the browser), so this module imports nothing.

export const FORMAT_VERSION = 1;

// ---------------------------------------------------------------------------- image

// Pillow's resampling filters (src/libImaging/Resample.c): [support, kernel].
const FILTERS = {
  2: [1, (x) => (Math.abs(x) < 1 ? 1 - Math.abs(x) : 0)], // bilinear
  3: [2, (x) => { // bicubic, a = -0.5
    const a = -0.5;
    x = Math.abs(x);
    if (x < 1) return ((a + 2) * x - (a + 3)) * x * x + 1;
    if (x < 2) return (((x - 5) * x + 8) * x - 4) * a;
    return 0;
  }],
};
const PRECISION_BITS = 22; // Pillow's fixed-point coefficients for 8-bit images

// Pillow's precompute_coeffs + normalize_coeffs_8bpc: per output pixel, the first input pixel
// and integer weights. Same arithmetic as Pillow, so the resized bytes are Pillow's bytes.
function coefficients(inSize, outSize, resample) {
  const [baseSupport, kernel] = FILTERS[resample];
  const scale = inSize / outSize;
  const filterScale = Math.max(scale, 1);
  const support = baseSupport * filterScale;
  const rows = [];
  for (let xx = 0; xx < outSize; xx++) {
    const center = (xx + 0.5) * scale;
    const xmin = Math.max(Math.trunc(center - support + 0.5), 0);
    const count = Math.min(Math.trunc(center + support + 0.5), inSize) - xmin;
    const w = [];
    let sum = 0;
    for (let x = 0; x < count; x++) {
      w.push(kernel((x + xmin - center + 0.5) * (1 / filterScale)));
      sum += w[x];
    }
    const fixed = w.map((v) => {
      const k = sum !== 0 ? v / sum : v;
      return Math.trunc(k < 0 ? -0.5 + k * 2 ** PRECISION_BITS : 0.5 + k * 2 ** PRECISION_BITS);
    });
    rows.push([xmin, fixed]);
  }
  return rows;
}

// One separable pass over `channels`-interleaved uint8 pixels, along x (horizontal) or y.
function resamplePass(src, width, height, channels, outSize, resample, horizontal) {
  const outW = horizontal ? outSize : width;
  const outH = horizontal ? height : outSize;
  const dst = new Uint8Array(outW * outH * channels);
  const coeffs = coefficients(horizontal ? width : height, outSize, resample);
  const half = 2 ** (PRECISION_BITS - 1);
  for (let y = 0; y < outH; y++) {
    for (let x = 0; x < outW; x++) {
      const [start, k] = coeffs[horizontal ? x : y];
      for (let c = 0; c < channels; c++) {
        let acc = half;
        for (let i = 0; i < k.length; i++) {
          const at = horizontal ? (y * width + start + i) : ((start + i) * width + x);
          acc += src[at * channels + c] * k[i];
        }
        dst[(y * outW + x) * channels + c] = Math.min(Math.max(Math.floor(acc / 2 ** PRECISION_BITS), 0), 255);
      }
    }
  }
  return dst;
}

// RGBA -> RGB, transparent pixels composited onto white the way Pillow's alpha_composite does.
function rgbOnWhite(rgba, count) {
  const rgb = new Uint8Array(count * 3);
  for (let p = 0; p < count; p++) {
    const a = rgba[p * 4 + 3];
    for (let c = 0; c < 3; c++) {
      const v = rgba[p * 4 + c];
      if (a === 255) { rgb[p * 3 + c] = v; continue; }
      const t = v * a * 128 + 255 * (255 - a) * 128 + (0x80 << 7); // 7 fractional bits, rounded
      rgb[p * 3 + c] = (((t >> 8) + t) >> 8) >> 7; // t / 255 as Pillow's SHIFTFORDIV255
    }
  }
  return rgb;
}

/**
 * Decoded RGBA pixels {data, width, height} -> Float32Array [1, 3, S, S] as
 * pgexport.processing.image does: onto white, resized with the manifest's Pillow filter,
 * /255, (x - mean) / std in float32, channels first.
 */
export function preprocess({ data, width, height }, manifest) {
  const size = manifest.image_size;
  const resample = manifest.image_resample ?? 3;
  if (!FILTERS[resample]) throw new Error(`image_resample ${resample} is not supported here (bilinear 2 or bicubic 3)`);
  let rgb = rgbOnWhite(data, width * height);
  // Pillow (13) runs the vertical pass first when the height shrinks over twice as much as the
  // width; the order changes the rounding between the passes.
  const verticalFirst = height - size > 0 && height - size > (width - size) * 2;
  if (verticalFirst && height !== size) rgb = resamplePass(rgb, width, height, 3, size, resample, false);
  const rows = verticalFirst ? size : height;
  if (width !== size) rgb = resamplePass(rgb, width, rows, 3, size, resample, true);
  if (!verticalFirst && height !== size) rgb = resamplePass(rgb, size, height, 3, size, resample, false);
  const out = new Float32Array(3 * size * size);
  const f = Math.fround;
  for (let c = 0; c < 3; c++) {
    const mean = f(manifest.image_mean[c]);
    const std = f(manifest.image_std[c]);
    for (let p = 0; p < size * size; p++) {
      out[c * size * size + p] = f(f(f(rgb[p * 3 + c] * (1 / 255)) - mean) / std);
    }
  }
  return out;
}

// ---------------------------------------------------------------------------- text

// Incremental detokenization (pgexport.processing.streaming.TextStream): decode everything so
// far and hand out the new text, holding it back while a run of byte-fallback tokens is open.
const BYTE_TOKEN = /^<0x[0-9A-Fa-f]{2}>$/;

class TextStream {
  constructor(tokenizer) {
    this.tokenizer = tokenizer;
    this.ids = [];
    this.emitted = "";
  }

  push(id) {
    this.ids.push(id);
    if (BYTE_TOKEN.test(this.tokenizer.id_to_token(id) ?? "")) return "";
    return this.finish();
  }

  finish() {
    const text = this.tokenizer.decode(this.ids, { skip_special_tokens: true });
    if (!text.startsWith(this.emitted)) return "";
    const piece = text.slice(this.emitted.length);
    this.emitted = text;
    return piece;
  }
}

// Four <locNNNN> (ymin, xmin, ymax, xmax in 1024 bins), optional <segNNN>, then the label.
const OBJECT = /((?:<loc\d{4}>){4})(?:<seg\d{3}>)*([^;<]*)/g;

/**
 * Detection text -> [{label, box: [x0, y0, x1, y1] in pixels}], as
 * pgexport.processing.detection.parse_detections (bins decoded as v / 1023).
 */
export function parseDetections(text, width, height) {
  return [...text.matchAll(OBJECT)].map(([, locs, label]) => {
    const [ymin, xmin, ymax, xmax] = locs.match(/\d{4}/g).map((v) => Number(v) / 1023);
    return { label: label.trim(), box: [xmin * width, ymin * height, xmax * width, ymax * height] };
  });
}

// ---------------------------------------------------------------------------- model

function argmax(values) {
  let best = 0;
  for (let i = 1; i < values.length; i++) if (values[i] > values[best]) best = i;
  return best;
}

const zeros = (type, n) => (type === "float16" ? new Uint16Array(n) : new Float32Array(n));

export class PaliGemma {
  /**
   * Read pgexport.json and the tokenizer, open the sessions the manifest names.
   * readJson(file) -> parsed JSON of a file in the folder; createSession(file) -> an
   * InferenceSession for a graph of the folder (it must find the graph's external data).
   */
  static async load({ ort, Tokenizer, readJson, createSession }) {
    const manifest = await readJson("pgexport.json");
    if (manifest.format_version !== FORMAT_VERSION) {
      throw new Error(`pgexport.json format_version ${manifest.format_version} is not supported (expected ${FORMAT_VERSION})`);
    }
    const tokenizerConfig = await readJson("tokenizer_config.json").catch(() => ({}));
    const tokenizer = new Tokenizer(await readJson(manifest.tokenizer), tokenizerConfig);
    const graphs = manifest.graphs;
    const vision = await createSession(graphs.vision_encoder);
    // decoder.onnx (one graph, a KV cache allocated once) where the folder has it; folders
    // written before its cache_position input run the prefill / decode pair.
    let decoder = graphs.decoder ? await createSession(graphs.decoder) : null;
    if (decoder && !decoder.inputNames.includes("cache_position")) {
      await decoder.release();
      decoder = null;
    }
    const steps = decoder ? { decoder } : { prefill: await createSession(graphs.prefill), decode: await createSession(graphs.decode) };
    return new PaliGemma(ort, manifest, tokenizer, vision, steps);
  }

  constructor(ort, manifest, tokenizer, vision, steps) {
    Object.assign(this, { ort, manifest, tokenizer, vision, ...steps });
    const m = manifest;
    const names = (template) => Array.from({ length: m.num_layers }, (_, i) => ["key", "value"].map(
      (kv) => template.replace("{i}", i).replace("{kv}", kv))).flat(); // layer 0 key, layer 0 value, ...
    this.pastNames = names(m.kv_cache?.past ?? "past_key_values.{i}.{kv}");
    this.presentNames = names(m.kv_cache?.present ?? "present.{i}.{kv}");
    const graph = this.decoder ?? this.decode;
    this.cacheType = graph.inputMetadata.find((v) => v.name === this.pastNames[0]).type; // float32 or float16
  }

  /** <image> x N, <bos>, the prompt and "\n" (tokenized without added special tokens). */
  promptIds(prompt) {
    const m = this.manifest;
    if (prompt.includes("<image>")) throw new Error("the prompt contains <image>; pass the text only, the image tokens are added");
    const text = this.tokenizer.encode(`${prompt}\n`, { add_special_tokens: false }).ids;
    return [...Array(m.num_image_tokens).fill(m.image_token_id), m.bos_token_id, ...text];
  }

  tensor(type, data, dims) {
    return new this.ort.Tensor(type, data, dims);
  }

  ints(values, dims) {
    return this.tensor("int64", BigInt64Array.from(values, BigInt), dims ?? [1, values.length]);
  }

  /**
   * Greedy token ids for pixels ([1, 3, S, S] Float32Array) and a prompt, yielded one at a time;
   * stops after eos (yielded) or maxNewTokens.
   */
  async *generateIds(pixels, prompt, maxNewTokens = 32) {
    const m = this.manifest;
    const ids = this.promptIds(prompt);
    if (ids.length + maxNewTokens > m.max_position_embeddings) {
      throw new Error(`prompt (${ids.length} tokens) + ${maxNewTokens} new tokens exceed the context of ${m.max_position_embeddings}`);
    }
    const size = m.image_size;
    const visionOut = await this.vision.run({ pixel_values: this.tensor("float32", pixels, [1, 3, size, size]) });
    const features = visionOut.image_features;
    const step = this.decoder ? this.decoderSteps(ids, features, maxNewTokens) : this.pairSteps(ids, features);
    let logits = (await step.next()).value;
    for (let n = 0; n < maxNewTokens; n++) {
      const token = argmax(logits.data);
      yield token;
      if (token === m.eos_token_id || n === maxNewTokens - 1) return;
      logits = (await step.next(token)).value;
    }
  }

  // decoder.onnx: fixed-length KV buffers of prompt + new tokens; each call writes the slots
  // `cache_position` and returns the updated buffers, fed back as the next call's past.
  async *decoderSteps(ids, features, maxNewTokens) {
    const m = this.manifest;
    const maxLen = ids.length + maxNewTokens;
    const dims = [1, m.num_kv_heads, maxLen, m.head_dim];
    let past = this.pastNames.map(() => this.tensor(this.cacheType, zeros(this.cacheType, dims.reduce((a, b) => a * b)), dims));
    const mask = new Array(maxLen).fill(0);
    const emptyFeatures = this.tensor(features.type, zeros(features.type, 0), [1, 0, m.hidden_size]);
    let feed = { input_ids: this.ints(ids), image_features: features, token_type_ids: this.ints(ids.map(() => 0)),
                 cache_position: this.ints(ids.map((_, i) => i), [ids.length]) };
    mask.fill(1, 0, ids.length);
    for (let slot = ids.length; ; slot++) {
      const out = await this.decoder.run({ ...feed, attention_mask: this.ints(mask), ...Object.fromEntries(this.pastNames.map((n, i) => [n, past[i]])) });
      past = this.presentNames.map((n) => out[n]);
      const token = yield out.logits;
      mask[slot] = 1;
      feed = { input_ids: this.ints([token]), image_features: emptyFeatures, token_type_ids: this.ints([1]),
               cache_position: this.ints([slot], [1]) };
    }
  }

  // prefill.onnx + decode.onnx: the past grows by one slot each step.
  async *pairSteps(ids, features) {
    let out = await this.prefill.run({ input_ids: this.ints(ids), image_features: features, attention_mask: this.ints(ids.map(() => 1)) });
    let length = ids.length;
    for (;;) {
      const token = yield out.logits;
      length += 1;
      const past = Object.fromEntries(this.pastNames.map((n, i) => [n, out[this.presentNames[i]]]));
      out = await this.decode.run({ input_ids: this.ints([token]), attention_mask: this.ints(new Array(length).fill(1)), ...past });
    }
  }

  /** The answer in pieces as the tokens arrive; joined, the pieces are the decoded text. */
  async *generate(pixels, prompt, maxNewTokens = 32) {
    const stream = new TextStream(this.tokenizer);
    for await (const id of this.generateIds(pixels, prompt, maxNewTokens)) {
      const piece = stream.push(id);
      if (piece) yield piece;
    }
    const rest = stream.finish();
    if (rest) yield rest;
  }

  async release() {
    for (const s of [this.vision, this.decoder, this.prefill, this.decode]) if (s) await s.release();
  }
}
