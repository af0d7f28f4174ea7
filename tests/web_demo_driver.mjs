// Drives the demo page (pgexport demo-web) in headless Chromium for tests/test_web_demo.py.
//
//   node tests/web_demo_driver.mjs URL CHROMIUM RUNS_JSON [SCREENSHOT.png]
//
// RUNS_JSON: [{"sample": "shapes_0.png", "task": "caption"|"question"|"detect", "text": "..."}].
// Prints one JSON line: per run the prompt, the answer, the number of boxes drawn and the canvas
// as a PNG data URL (the image with the boxes), plus the page's uncaught errors.

import { createRequire } from "node:module";
import path from "node:path";
import { fileURLToPath } from "node:url";

const here = path.dirname(fileURLToPath(import.meta.url));
const { chromium } = createRequire(path.join(here, "..", "examples", "web", "package.json"))("playwright-core");

const [url, executablePath, runsJson, screenshot] = process.argv.slice(2);
const browser = await chromium.launch({ executablePath, args: ["--no-sandbox"] });
try {
  const page = await browser.newPage({ viewport: { width: 980, height: 560 } });
  const errors = [];
  page.on("pageerror", (e) => errors.push(String(e)));
  await page.goto(url);
  await page.waitForSelector("#status[data-state=ready], #status[data-state=error]", { timeout: 120_000 });
  const results = [];
  for (const run of JSON.parse(runsJson)) {
    await page.click(`#samples button[data-sample="${run.sample}"]`);
    await page.waitForSelector(`#image[data-image="${run.sample}"]`);
    await page.check(`input[name=task][value=${run.task}]`);
    if (run.task === "question") await page.fill("#question", run.text);
    if (run.task === "detect") await page.fill("#object", run.text);
    await page.click("#run");
    await page.waitForSelector("#status[data-state=done], #status[data-state=error]", { timeout: 120_000 });
    results.push(await page.evaluate(() => {
      const canvas = document.getElementById("image");
      const status = document.getElementById("status");
      return { prompt: document.getElementById("prompt").textContent, answer: document.getElementById("answer").textContent,
               state: status.dataset.state, status: status.textContent, boxes: Number(canvas.dataset.boxes),
               canvas: canvas.toDataURL("image/png") };
    }));
  }
  if (screenshot) await page.screenshot({ path: screenshot });
  console.log(JSON.stringify({ results, errors }));
} finally {
  await browser.close();
}
