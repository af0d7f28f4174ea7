// A PNG reader on node:zlib: file bytes -> {data: RGBA Uint8Array, width, height}.
// 8-bit greyscale / RGB / RGBA / grey+alpha, palettes of 1-8 bits, tRNS transparency;
// no interlacing, no 16-bit samples (re-save such files as 8-bit PNG).

import { inflateSync } from "node:zlib";

const SIGNATURE = "89504e470d0a1a0a";
const CHANNELS = { 0: 1, 2: 3, 3: 1, 4: 2, 6: 4 }; // colour type -> samples per pixel

function paeth(a, b, c) {
  const p = a + b - c;
  const pa = Math.abs(p - a), pb = Math.abs(p - b), pc = Math.abs(p - c);
  return pa <= pb && pa <= pc ? a : pb <= pc ? b : c;
}

export function decodePng(bytes) {
  const buf = Buffer.from(bytes);
  if (buf.subarray(0, 8).toString("hex") !== SIGNATURE) throw new Error("not a PNG file; convert the image to PNG");
  let width, height, depth, type, interlace, palette, trns;
  const idat = [];
  for (let at = 8; at < buf.length;) {
    const length = buf.readUInt32BE(at);
    const name = buf.toString("latin1", at + 4, at + 8);
    const body = buf.subarray(at + 8, at + 8 + length);
    if (name === "IHDR") [width, height, depth, type, interlace] = [body.readUInt32BE(0), body.readUInt32BE(4), body[8], body[9], body[12]];
    else if (name === "PLTE") palette = body;
    else if (name === "tRNS") trns = body;
    else if (name === "IDAT") idat.push(body);
    else if (name === "IEND") break;
    at += 12 + length;
  }
  const channels = CHANNELS[type];
  if (!channels || interlace || depth > 8 || (depth < 8 && type !== 3 && type !== 0)) {
    throw new Error(`unsupported PNG (colour type ${type}, ${depth}-bit${interlace ? ", interlaced" : ""}); re-save it as an 8-bit PNG`);
  }
  const raw = inflateSync(Buffer.concat(idat));
  const bpp = Math.max(1, (channels * depth) >> 3); // bytes per pixel, for the filters
  const stride = Math.ceil((width * channels * depth) / 8);
  const rows = new Uint8Array(height * stride);
  for (let y = 0; y < height; y++) { // undo the per-row filters
    const filter = raw[y * (stride + 1)];
    const line = raw.subarray(y * (stride + 1) + 1, (y + 1) * (stride + 1));
    for (let x = 0; x < stride; x++) {
      const a = x >= bpp ? rows[y * stride + x - bpp] : 0;
      const b = y > 0 ? rows[(y - 1) * stride + x] : 0;
      const c = x >= bpp && y > 0 ? rows[(y - 1) * stride + x - bpp] : 0;
      const predict = [0, a, b, (a + b) >> 1, paeth(a, b, c)][filter];
      rows[y * stride + x] = (line[x] + predict) & 255;
    }
  }
  const sample = (y, i) => depth === 8 ? rows[y * stride + i]
    : (rows[y * stride + ((i * depth) >> 3)] >> (8 - depth - ((i * depth) & 7))) & ((1 << depth) - 1);
  const data = new Uint8Array(width * height * 4);
  for (let y = 0; y < height; y++) {
    for (let x = 0; x < width; x++) {
      const s = (k) => sample(y, x * channels + k);
      let rgba;
      if (type === 3) {
        const i = s(0);
        rgba = [palette[i * 3], palette[i * 3 + 1], palette[i * 3 + 2], trns && i < trns.length ? trns[i] : 255];
      } else {
        const grey = type === 0 || type === 4;
        const scale = depth < 8 ? 255 / ((1 << depth) - 1) : 1;
        const rgb = grey ? [s(0) * scale, s(0) * scale, s(0) * scale] : [s(0), s(1), s(2)];
        let alpha = type === 4 ? s(1) : type === 6 ? s(3) : 255;
        if (trns && type === 0 && s(0) === trns.readUInt16BE(0)) alpha = 0; // colour-key transparency
        if (trns && type === 2 && s(0) === trns.readUInt16BE(0) && s(1) === trns.readUInt16BE(2) && s(2) === trns.readUInt16BE(4)) alpha = 0;
        rgba = [...rgb, alpha];
      }
      data.set(rgba, (y * width + x) * 4);
    }
  }
  return { data, width, height };
}
