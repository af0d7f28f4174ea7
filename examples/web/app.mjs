// The demo page: pick an image and a task, stream the answer, draw detected boxes. The model
// runs here, in onnxruntime-web (WebAssembly); the server only hands out files.

import { Tokenizer } from "@huggingface/tokenizers";
import * as ort from "onnxruntime-web";

import { PaliGemma, parseDetections, preprocess } from "./pgexport.mjs";

const MAX_NEW_TOKENS = 32;
const VIEW = 336; // canvas side for the longer image side
const PALETTE = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45"];
const $ = (id) => document.getElementById(id);

// Threads need a cross-origin isolated page (pgexport demo-web sends the headers for it).
ort.env.wasm.numThreads = self.crossOriginIsolated ? Math.min(4, navigator.hardwareConcurrency || 1) : 1;

let model = null;
let current = null; // {bitmap, rgba: {data, width, height}}

function setStatus(state, text) {
  $("status").dataset.state = state;
  $("status").textContent = text;
}

async function fetchOk(url) {
  const response = await fetch(url);
  if (!response.ok) throw new Error(`${url}: HTTP ${response.status}`);
  return response;
}

const bytes = async (url) => new Uint8Array(await (await fetchOk(url)).arrayBuffer());

async function loadModel() {
  const readJson = async (file) => (await fetchOk(`model/${file}`)).json();
  const manifest = await readJson("pgexport.json");
  // A session is created from bytes, so it is handed the folder's weight files itself: each is
  // fetched once and offered to every graph, which reads the one it names.
  const dataFiles = Object.keys(manifest.files ?? {}).filter((f) => f.endsWith(".data"));
  const externalData = await Promise.all(dataFiles.map(async (path) => ({ path, data: await bytes(`model/${path}`) })));
  return PaliGemma.load({
    ort,
    Tokenizer,
    readJson,
    createSession: async (file) => ort.InferenceSession.create(await bytes(`model/${file}`), { externalData }),
  });
}

function prompt() {
  const task = document.querySelector("input[name=task]:checked").value;
  if (task === "question") return `answer en ${$("question").value.trim()}`;
  if (task === "detect") return `detect ${$("object").value.trim()}`;
  return "caption en";
}

// The image, then each detected object's box and label (one colour per label); boxes in the
// image's pixels, listed under the answer as `pgexport generate` prints them.
function draw(detections = []) {
  const canvas = $("image");
  const ctx = canvas.getContext("2d");
  const [sx, sy] = current ? [canvas.width / current.rgba.width, canvas.height / current.rgba.height] : [1, 1];
  $("objects").replaceChildren(...detections.map(({ label, box }) => Object.assign(document.createElement("li"), {
    textContent: `${label || "(no label)"}: ${["x0", "y0", "x1", "y1"].map((k, i) => `${k}=${Math.round(box[i])}`).join(" ")}`,
  })));
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  if (current) ctx.drawImage(current.bitmap, 0, 0, canvas.width, canvas.height);
  const colours = new Map();
  ctx.lineWidth = Math.max(2, Math.floor(Math.min(canvas.width, canvas.height) / 150));
  ctx.font = "13px sans-serif";
  ctx.textBaseline = "top";
  for (const { label, box } of detections) {
    const [x0, y0, x1, y1] = box.map((v, i) => v * (i % 2 ? sy : sx));
    if (!colours.has(label)) colours.set(label, PALETTE[colours.size % PALETTE.length]);
    ctx.strokeStyle = ctx.fillStyle = colours.get(label);
    ctx.strokeRect(x0, y0, x1 - x0, y1 - y0);
    if (label) {
      const tabY = y0 >= 18 ? y0 - 18 : y0; // above the box, or inside it at the top edge
      ctx.fillRect(x0, tabY, ctx.measureText(label).width + 6, 18);
      ctx.fillStyle = "white";
      ctx.fillText(label, x0 + 3, tabY + 3);
    }
  }
  canvas.dataset.boxes = String(detections.length);
}

// `blob` may be a promise; until the image is in, Run waits (an answer is never left next to
// another image).
async function setImage(blob, name, button = null) {
  delete $("image").dataset.image;
  $("run").disabled = true;
  // No colour management: the pixels are the file's, as Pillow reads them.
  const bitmap = await createImageBitmap(await blob, { colorSpaceConversion: "none", premultiplyAlpha: "none" });
  const full = new OffscreenCanvas(bitmap.width, bitmap.height).getContext("2d");
  full.drawImage(bitmap, 0, 0);
  const { data } = full.getImageData(0, 0, bitmap.width, bitmap.height);
  current = { bitmap, rgba: { data, width: bitmap.width, height: bitmap.height } };
  const scale = VIEW / Math.max(bitmap.width, bitmap.height);
  Object.assign($("image"), { width: Math.round(bitmap.width * scale), height: Math.round(bitmap.height * scale) });
  document.querySelectorAll("#samples button").forEach((b) => b.classList.toggle("selected", b === button));
  $("answer").textContent = "";
  $("image").dataset.image = name;
  $("run").disabled = !model;
  draw();
}

async function run() {
  if (!model || !current) return;
  const text = prompt();
  $("prompt").textContent = text;
  $("answer").textContent = "";
  $("run").disabled = true;
  draw();
  setStatus("running", "generating…");
  try {
    const start = performance.now();
    let answer = "";
    const pixels = preprocess(current.rgba, model.manifest);
    for await (const piece of model.generate(pixels, text, MAX_NEW_TOKENS)) {
      answer += piece;
      $("answer").textContent = answer;
      draw(parseDetections(answer, current.rgba.width, current.rgba.height));
      await new Promise((resolve) => setTimeout(resolve, 0)); // let the page paint the new text
    }
    setStatus("done", `done in ${Math.round(performance.now() - start)} ms`);
  } catch (error) {
    setStatus("error", `error: ${error.message}`);
  } finally {
    $("run").disabled = false;
  }
}

async function main() {
  const samples = await (await fetchOk("samples.json")).json();
  for (const name of samples) {
    const button = document.createElement("button");
    button.dataset.sample = name;
    button.title = name;
    button.innerHTML = `<img src="samples/${encodeURIComponent(name)}" alt="${name}">`;
    button.onclick = () => setImage(fetchOk(`samples/${encodeURIComponent(name)}`).then((r) => r.blob()), name, button);
    $("samples").append(button);
  }
  $("file").onchange = (event) => event.target.files[0] && setImage(event.target.files[0], event.target.files[0].name);
  $("run").onclick = run;
  if (samples.length) await $("samples").firstChild.onclick();
  model = await loadModel();
  $("run").disabled = false;
  setStatus("ready", `model loaded (${model.manifest.dtype}, ${model.manifest.num_layers} layers)`);
}

main().catch((error) => setStatus("error", `error: ${error.message}`));
