"""Run an export folder with ONNX Runtime: `OnnxPaliGemma` (numpy + onnxruntime, no torch).

    >>> from pgexport.runtime.session import OnnxPaliGemma
    >>> from pgexport import Sampling
    >>> model = OnnxPaliGemma("exports/paligemma-3b-pt-224")  # doctest: +SKIP
    >>> model.generate([image], ["caption en"], max_new_tokens=32)  # doctest: +SKIP
    ['a cat sitting on a sofa']

The step API is for applications that drive decoding themselves (streaming, their own sampling,
batching):

    >>> batch = model.processor(images=[image], prompts=["caption en"])  # doctest: +SKIP
    >>> features = model.encode_image(batch["pixel_values"])  # doctest: +SKIP
    >>> logits, past = model.prefill(batch["input_ids"], features, batch["attention_mask"])  # doctest: +SKIP
    >>> mask = np.concatenate([batch["attention_mask"], np.ones((1, 1), np.int64)], axis=1)  # doctest: +SKIP
    >>> logits, past = model.decode(logits.argmax(-1)[:, None], mask, past)  # doctest: +SKIP

`past` is a list of `2 * num_layers` `onnxruntime.OrtValue`s (`past_key_values.{i}.key|value`,
`[batch, kv_heads, seq, head_dim]`), kept where the graphs run: on the GPU with
`provider="cuda"` (bound with I/O binding, so only the logits come back to the host each step).
`OrtValue.numpy()` copies one to the host; numpy arrays are accepted as `past` too. This step API
grows `past` by one slot per step, which copies the cache every step. `model.stepper()` (what
`generate` and `generate_stream` use) does not:

    >>> stepper = model.stepper()  # doctest: +SKIP
    >>> logits = stepper.prefill(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], 32)  # doctest: +SKIP
    >>> logits = stepper.decode(logits.argmax(-1))  # doctest: +SKIP

KV cache. With decoder.onnx the stepper allocates the cache once per call, for the prompt plus
`max_new_tokens` (on the device with CUDA), and binds each layer's buffer as both the `past` input
and the `present` output: the graph scatters the new keys/values into it in place, so a step
reads the cache once (attention) and copies none of it.

Memory. A folder written by this pgexport holds `decoder.onnx`, prefill and decode in one graph
(a prefix/causal marker, `token_type_ids`, keeps the prefix-LM mask exact). It runs in ONE
ONNX Runtime session (`single_decoder`, the default when the folder has it), so the decoder
weights are loaded and prepacked once, and the fast CPU kernels (which read prepacked weights)
cost no second copy. prefill.onnx and decode.onnx stay in the folder for applications that use
the three-graph contract; `single_decoder=False` runs them in two sessions. Either way the graphs
share one data file (`decoder.onnx.data`). `share_weights` chooses how the sessions get it:

* `True` (default) = `"buffers"` on CPU: each data file is memory-mapped once and handed to the
  sessions (`add_external_initializers_from_files_in_memory` with
  `session.use_external_initializer_file_buffers_directly=1`). The single decoder session
  prepacks; the mapped pages are dropped from the process once the sessions exist (what the
  kernels still read faults back in from the page cache). With two decoder sessions, fp32
  prepacking is off (`session.disable_prepacking=1`) so that both use the one mapped copy, at the
  price of GEMMs that pack on the fly (slower batched decode and prefill).
* `True` = `"initializers"` on CUDA: each decoder weight is uploaded to the GPU once and the same
  device buffer is given to every session that names it (`add_initializer`). (On CPU,
  `"initializers"` makes one private in-memory copy shared the same way, prepacking off.)
* `False`: ONNX Runtime loads each graph itself and prepacks (one copy per session).

Weight-quantized exports (`quantization.bits` in the manifest) keep prepacking on in every mode:
the MatMulNBits and DynamicQuantizeMatMul CPU kernels fall back to dequantizing the whole
weight on every call without their prepacked weights. benchmarks/bench_runtime_memory.py
measures each mode's memory and speed.

Thread safety: sessions are shared, per-call state (KV cache, mask) lives in each call, so
`generate` may be called from several threads at once.
"""

from __future__ import annotations

import mmap
import os
import warnings
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from pgexport.errors import PgExportError, one_line
from pgexport.processing.processor import PaliGemmaProcessor
from pgexport.processing.streaming import stream_text
from pgexport.processing.tokenizer import load_tokenizer
from pgexport.runtime.generation import Sampling, generate_tokens, iter_tokens
from pgexport.runtime.manifest import Manifest, describe_quantization, read_manifest
from pgexport.runtime.onnx_files import ExternalRef, check_external_data, load_graph_proto

VISION_INPUTS = ["pixel_values"]
DECODER_INPUTS = ["input_ids", "image_features", "attention_mask", "token_type_ids", "cache_position"]  # then the past
VISION_OUTPUTS = ["image_features"]
PREFILL_INPUTS = ["input_ids", "image_features", "attention_mask"]

_NP_TYPES = {
    "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32,
}
# onnx.TensorProto data types that numpy can view directly (for sharing initializers on CUDA)
_ONNX_NP = {1: np.float32, 2: np.uint8, 3: np.int8, 5: np.int16, 6: np.int32, 7: np.int64,
            10: np.float16, 11: np.float64, 12: np.uint32, 13: np.uint64}
# Initializers smaller than this are left to ONNX Runtime on CUDA (shape constants and the like
# may be placed on the CPU, where a device copy could not be used).
_SHARE_MIN_BYTES = 1024


class OnnxPaliGemma:
    """An export folder in ONNX Runtime sessions (vision encoder + decoder); see the module docstring.

    Arguments:
        export_dir: folder written by `pgexport onnx` / `export_folder` (holds pgexport.json).
        provider: "cpu" or "cuda" (CUDAExecutionProvider, needs onnxruntime-gpu).
        threads: intra-op threads per session (None: ONNX Runtime's default, one per core).
        share_weights: True (default): one copy of the weights for all sessions ("buffers":
            memory-mapped files on CPU; "initializers" on CUDA); False: ONNX Runtime loads and
            prepacks a copy per session.
        device_id: CUDA device index.
        log_level: ONNX Runtime log severity (0 verbose .. 4 fatal; default 3, errors only).
        single_decoder: None (default): decoder.onnx in one session when the folder has it;
            False: prefill.onnx and decode.onnx in two sessions (folders written before
            decoder.onnx existed run that way).
    """

    def __init__(self, export_dir: str | os.PathLike, provider: str = "cpu", threads: int | None = None,
                 share_weights: bool | str = True, device_id: int = 0, log_level: int = 3,
                 single_decoder: bool | None = None):
        self.export_dir = Path(export_dir)
        self.manifest: Manifest = read_manifest(self.export_dir)
        self.provider = provider.lower()
        if self.provider not in ("cpu", "cuda"):
            raise PgExportError(f"unknown provider {provider!r}; use 'cpu' or 'cuda'")
        if self.provider == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
            raise PgExportError("provider='cuda' was requested but this onnxruntime has no CUDAExecutionProvider "
                                f"(available: {', '.join(ort.get_available_providers())}); install onnxruntime-gpu "
                                "or use provider='cpu'")
        if threads is not None and threads < 1:
            raise PgExportError(f"threads must be >= 1 (or None for one per core), got {threads}")
        self.threads, self.share_weights, self.device_id = threads, share_weights, device_id
        self._log_level = log_level
        self._device = ("cuda", device_id) if self.provider == "cuda" else ("cpu", 0)
        m = self.manifest
        # Weight-quantized exports (pgexport onnx --quant int8|int4) keep prepacking on: without their
        # prepacked weights the MatMulNBits / DynamicQuantizeMatMul CPU kernels dequantize the
        # whole weight on every call.
        self.quantized = isinstance(m.quantization, dict)
        cpu_formats = {  # int8 formats made for the CPU provider
            "dynamic": "uses DynamicQuantizeMatMul, which ONNX Runtime runs on the CPU even with provider='cuda'",
            "rowwise": "(--int8-format rowwise) is built for the CPU provider"}
        int8_format = m.quantization.get("int8_format") if self.quantized else None
        if self.provider == "cuda" and int8_format in cpu_formats:
            warnings.warn(f"this int8 export {cpu_formats[int8_format]}; re-export with "
                          "`pgexport onnx --quant int8 --target cuda` (MatMulNBits)", stacklevel=2)
        self._past_names, self._present_names = m.past_names(), m.present_names()
        paths = {key: self.export_dir / name for key, name in m.graphs.items()}
        # One decoder session (decoder.onnx: prefill and decode in one graph over a cache allocated
        # once) when the folder has it: the decoder weights are then loaded and prepacked once
        # instead of once per graph. A decoder.onnx of the earlier form (a growing past, no
        # `cache_position`) is left alone: such folders run prefill.onnx and decode.onnx.
        has_decoder = "decoder" in m.graphs and _has_input(paths["decoder"], "cache_position")
        if single_decoder and not has_decoder:
            raise PgExportError(f"{self.export_dir} has no decoder.onnx of this version (single_decoder=True); "
                                "re-export it with this pgexport, or pass single_decoder=None")
        self.single_decoder = has_decoder if single_decoder is None else bool(single_decoder)

        # 1. Every graph is read (without its data) and checked before any session opens it:
        #    readable, external data inside the folder and long enough, inputs/outputs as promised.
        refs: dict[str, list[ExternalRef]] = {}
        expected_io = {
            "vision_encoder": (VISION_INPUTS, VISION_OUTPUTS),
            "prefill": (PREFILL_INPUTS, ["logits", *self._present_names]),
            "decode": (["input_ids", "attention_mask", *self._past_names], ["logits", *self._present_names]),
            "decoder": (DECODER_INPUTS + self._past_names, ["logits", *self._present_names]),
        }
        # Every graph the folder lists, including the ones this runtime will not open: a folder
        # with one damaged or unsafe graph is refused whole.
        for key in ("vision_encoder", "prefill", "decode", *(("decoder",) if has_decoder else ())):
            proto = load_graph_proto(paths[key])
            refs[key] = check_external_data(paths[key], proto)
            init_names = {t.name for t in proto.graph.initializer}
            inputs = [i.name for i in proto.graph.input if i.name not in init_names]
            outputs = [o.name for o in proto.graph.output]
            want_in, want_out = expected_io[key]
            if inputs != want_in or outputs != want_out:
                raise PgExportError(f"{paths[key]} is not the {key} graph that {m.graphs[key]!r} in pgexport.json "
                                    f"promises (inputs {inputs[:4]}..., outputs {outputs[:3]}...); re-export the folder")
            del proto

        # 2. Sessions. Buffers handed to ONNX Runtime (memory maps, device weights) must outlive
        #    the sessions: they are kept in self._maps / self._device_weights until close().
        self._maps: dict[str, np.ndarray | None] = {}
        self._device_weights: dict[tuple, Any] = {}
        self._owned_weights: list = []
        self.share_mode = share_mode = _share_mode(share_weights, self.provider)
        self.vision = self._session(paths["vision_encoder"], refs["vision_encoder"],
                                    share="buffers" if share_mode == "buffers" else None)
        if self.single_decoder:
            # One session: it may prepack its weights (the fast CPU kernels) without a second copy.
            self.decoder_session = self._session(paths["decoder"], refs["decoder"], share=share_mode,
                                                 prepack=share_mode == "buffers")
            self.prefill_session = self.decode_session = self.decoder_session
        else:
            self.prefill_session = self._session(paths["prefill"], refs["prefill"], share=share_mode)
            self.decode_session = self._session(paths["decode"], refs["decode"], share=share_mode)
        if share_mode != "buffers":
            self._maps.clear()  # only read to make the shared initializers: unmap the files
        else:
            self._release_pages()

        types = {i.name: i.type for i in self.vision.get_inputs()}
        self._pixel_dtype = _NP_TYPES.get(types["pixel_values"], np.float32)
        self._features_dtype = _NP_TYPES.get(
            {i.name: i.type for i in self.prefill_session.get_inputs()}["image_features"], np.float32)
        self._past_dtype = _NP_TYPES.get(
            {i.name: i.type for i in self.decode_session.get_inputs()}[self._past_names[0]], np.float32)

        tok_path = self.export_dir / m.tokenizer
        tokenizer = load_tokenizer(self.export_dir) if tok_path.name in ("tokenizer.json", "tokenizer.model") \
            else _load_named_tokenizer(tok_path)
        self.processor = PaliGemmaProcessor(tokenizer, image_size=m.image_size, num_image_tokens=m.num_image_tokens,
                                            mean=tuple(m.image_mean), std=tuple(m.image_std), resample=m.image_resample)
        for name, want in (("<image>", m.image_token_id), ("<bos>", m.bos_token_id), ("<eos>", m.eos_token_id)):
            got = tokenizer.token_to_id(name)
            if got != want:
                raise PgExportError(f"{tok_path}: {name} is id {got} but pgexport.json says {want}; "
                                    "the tokenizer does not belong to this export, re-export the folder")

    @property
    def cache_dtype(self):
        """numpy dtype of the KV cache (the weights' dtype: float16 in an fp16 export)."""
        return self._past_dtype

    @property
    def features_dtype(self):
        """numpy dtype of `image_features`."""
        return self._features_dtype

    # ------------------------------------------------------------------ sessions
    def _providers(self):
        if self.provider == "cuda":
            return [("CUDAExecutionProvider", {"device_id": str(self.device_id)}), "CPUExecutionProvider"]
        return ["CPUExecutionProvider"]

    def _memmap(self, folder: Path, location: str) -> np.ndarray | None:
        """The data file mapped read-only, once per file (a uint8 view of one `mmap.mmap`)."""
        if location not in self._maps:
            path = folder / location
            if not path.stat().st_size:
                self._maps[location] = None
            else:
                with open(path, "rb") as f:
                    self._maps[location] = np.frombuffer(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ), np.uint8)
        return self._maps[location]

    def _release_pages(self) -> None:
        """Drop the data files' pages from this process once the sessions exist.

        Creating a session reads every weight (prepacking copies the matmul weights into the
        kernels' own layout), which leaves the whole file resident in this process although the
        prepacked weights never read it again. What the kernels still read from the files (norms,
        lookup tables, an fp32 vision encoder run in place) faults back in from the page cache as
        it is used; nothing is lost, since the maps are read-only views of the files.
        """
        if not hasattr(mmap, "MADV_DONTNEED"):
            return
        for view in self._maps.values():
            if view is not None:
                view.base.obj.madvise(mmap.MADV_DONTNEED)  # base: a memoryview of the mmap.mmap

    def _session(self, path: Path, refs: list[ExternalRef], share: str | None, prepack: bool = False):
        so = ort.SessionOptions()
        so.log_severity_level = self._log_level
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.inter_op_num_threads = 1
        if self.threads:
            so.intra_op_num_threads = self.threads
        if share == "buffers":
            # One memory map per data file, handed to every session that reads it; ONNX Runtime uses
            # the mapped bytes in place (no copy) and does not prepack (which would copy again).
            names, buffers, lengths = [], [], []
            for location in sorted({r.location for r in refs}):
                mm = self._memmap(path.parent, location)
                if mm is not None:
                    names.append(location)
                    buffers.append(mm)
                    lengths.append(mm.nbytes)
            if names:
                so.add_external_initializers_from_files_in_memory(names, buffers, lengths)
                so.add_session_config_entry("session.use_external_initializer_file_buffers_directly", "1")
            if not (self.quantized or prepack):
                so.add_session_config_entry("session.disable_prepacking", "1")
        elif share == "initializers":
            # Each large weight becomes one OrtValue on the session's device, given to every session
            # that names it (AddInitializer). ORT only uses it where the session planned that device
            # (else it logs a warning and loads its own copy); smaller tensors stay with ORT.
            for ref in refs:
                np_type = _ONNX_NP.get(ref.data_type)
                if (ref.initializer and np_type is not None and ref.length >= _SHARE_MIN_BYTES
                        and ref.length == np.dtype(np_type).itemsize * int(np.prod(ref.dims, dtype=np.int64))):
                    so.add_initializer(ref.name, self._shared_initializer(path.parent, ref))
            if self.provider == "cpu" and not (self.quantized or prepack):
                so.add_session_config_entry("session.disable_prepacking", "1")
        try:
            session = ort.InferenceSession(str(path), so, providers=self._providers())
        except Exception as e:  # ORT's errors are long, multi-line C++ messages
            raise PgExportError(f"ONNX Runtime cannot load {path}: {one_line(e)}; the file may be corrupt or from "
                                "an incompatible export, re-export the folder") from None
        if self.provider == "cuda" and "CUDAExecutionProvider" not in session.get_providers():
            raise PgExportError(f"ONNX Runtime could not run {path.name} on CUDA (it fell back to "
                                f"{session.get_providers()}); check the CUDA/cuDNN install, or use provider='cpu'")
        return session

    def _shared_initializer(self, folder: Path, ref: ExternalRef):
        """The OrtValue of one external tensor on this model's device, created once per distinct bytes."""
        key = (ref.location, ref.offset, ref.length, ref.data_type, ref.dims)
        value = self._device_weights.get(key)
        if value is None:
            np_type = _ONNX_NP[ref.data_type]
            count = ref.length // np.dtype(np_type).itemsize
            host = np.frombuffer(self._memmap(folder, ref.location), dtype=np_type, count=count, offset=ref.offset)
            host = np.array(host.reshape(ref.dims))  # private, aligned, writable
            # On CUDA, ORT allocates and owns a device buffer (the one upload; `host` is then freed);
            # on CPU the OrtValue wraps `host` (and keeps it alive).
            owned = ort.OrtValue.ortvalue_from_numpy(host, *self._device)
            # AddInitializer only takes buffers ORT does not own: a DLPack view of the same memory
            # is one (same pointer, no copy). `owned` is kept alive beside it until close().
            value = ort.OrtValue.from_dlpack(owned)
            self._device_weights[key] = value
            self._owned_weights.append(owned)
        return value

    @property
    def providers(self) -> list[str]:
        return self.decode_session.get_providers()

    def close(self) -> None:
        """Release the sessions, then the buffers they read from."""
        for name in ("vision", "prefill_session", "decode_session", "decoder_session"):
            if hasattr(self, name):
                delattr(self, name)
        self._device_weights.clear()
        self._owned_weights.clear()
        self._maps.clear()

    def __enter__(self) -> OnnxPaliGemma:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        m = self.manifest
        return (f"OnnxPaliGemma({str(self.export_dir)!r}, provider={self.provider!r}, dtype={m.dtype}, "
                f"quantization={describe_quantization(m.quantization)!r}, layers={m.num_layers}, "
                f"share_weights={self.share_weights})")

    # ------------------------------------------------------------------ step API
    def _value(self, x, dtype):
        """An OrtValue stays as it is; anything else becomes a contiguous numpy array of `dtype`."""
        if isinstance(x, ort.OrtValue):
            return x
        return np.ascontiguousarray(np.asarray(x), dtype=dtype)

    def _bind_input(self, binding, name: str, x) -> None:
        if isinstance(x, np.ndarray):
            binding.bind_cpu_input(name, x)  # copied to the device when the session runs on CUDA
        else:
            binding.bind_ortvalue_input(name, x)

    def encode_image(self, pixel_values, keep_on_device: bool = False):
        """pixel_values `[B, 3, size, size]` -> image_features `[B, num_image_tokens, hidden]`.

        Returns numpy, or with `keep_on_device` the OrtValue where the session ran (no copy).
        """
        pixels = self._value(pixel_values, self._pixel_dtype)
        shape = _shape(pixels)
        size = self.manifest.image_size
        if len(shape) != 4 or tuple(shape[1:]) != (3, size, size):
            raise PgExportError(f"pixel_values has shape {list(shape)}; expected [batch, 3, {size}, {size}] "
                                "(use model.processor to prepare images)")
        binding = self.vision.io_binding()
        self._bind_input(binding, "pixel_values", pixels)
        binding.bind_output("image_features", *self._device)
        self.vision.run_with_iobinding(binding)
        features = binding.get_outputs()[0]
        return features if keep_on_device else features.numpy()

    def _run_decoder(self, session, inputs: dict[str, Any]):
        binding = session.io_binding()
        for name, x in inputs.items():
            self._bind_input(binding, name, x)
        binding.bind_output("logits", "cpu")  # the only per-step copy to the host
        for name in self._present_names:
            binding.bind_output(name, *self._device)  # the cache stays where the session runs
        session.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        logits = outputs[0].numpy()
        if logits.dtype != np.float32:
            logits = logits.astype(np.float32)
        return logits, list(outputs[1:])

    def prefill(self, input_ids, image_features, attention_mask):
        """The whole prompt -> (logits `[B, vocab]` float32 of each row's last real token, past).

        `input_ids`/`attention_mask`: int64 `[B, S]` (left or right padding; `<image>` ids where
        the image features go). `past`: `2 * num_layers` OrtValues `[B, kv_heads, S, head_dim]`.
        """
        ids = self._value(input_ids, np.int64)
        mask = self._value(attention_mask, np.int64)
        if isinstance(ids, np.ndarray) and isinstance(mask, np.ndarray) and (ids.ndim != 2 or ids.shape != mask.shape):
            raise PgExportError(f"input_ids {list(ids.shape)} and attention_mask {list(mask.shape)} must both be [batch, seq]")
        feats = self._value(image_features, self._features_dtype)
        feed = {"input_ids": ids, "image_features": feats, "attention_mask": mask}
        if not self.single_decoder:
            return self._run_decoder(self.prefill_session, feed)
        batch, seq = _shape(ids)  # the whole prompt is prefix, written into a cache of its length
        feed.update(token_type_ids=np.zeros((batch, seq), np.int64), cache_position=np.arange(seq, dtype=np.int64))
        cache = self.new_cache(batch, seq)
        return self.run_in_place(feed, cache), cache

    def decode(self, input_ids, attention_mask, past: Sequence):
        """One token per row -> (logits `[B, vocab]` float32, present with one more slot).

        `input_ids` `[B, 1]` (or `[B]`), `attention_mask` `[B, past + 1]` (the prompt's mask with
        a 1 appended per decoded token), `past` as returned by `prefill` / the previous `decode`.
        """
        ids = self._value(input_ids, np.int64)
        if isinstance(ids, np.ndarray) and ids.ndim == 1:
            ids = ids[:, None]
        mask = self._value(attention_mask, np.int64)
        if len(past) != len(self._past_names):
            raise PgExportError(f"past has {len(past)} tensors; this model needs {len(self._past_names)} "
                                f"(key and value of {self.manifest.num_layers} layers)")
        feed = {"input_ids": ids, "attention_mask": mask}
        if not self.single_decoder:
            feed.update({name: self._value(p, self._past_dtype) for name, p in zip(self._past_names, past)})
            return self._run_decoder(self.decode_session, feed)
        # decoder.onnx writes into fixed-length buffers: grow each by one slot (the copy that
        # `stepper()` avoids), then write the token there.
        grown = []
        for p in past:
            host = p.numpy() if isinstance(p, ort.OrtValue) else np.asarray(p, self._past_dtype)
            grown.append(self._device_value(np.concatenate([host, np.zeros_like(host[:, :, :1])], axis=2)))
        return self.decode_in_place(ids, mask, grown, _shape(grown[0])[2] - 1), grown

    def decode_in_place(self, input_ids, attention_mask, cache: Sequence, slot: int) -> np.ndarray:
        """One token per row written into `cache` (from `new_cache`) at `slot` -> logits `[B, vocab]`.

        `attention_mask` `[B, max_len]`: 1 for the real tokens written so far and this one (at
        `slot`), 0 for padding and the slots not written yet.
        """
        ids = np.asarray(input_ids, np.int64).reshape(-1, 1)
        batch = len(ids)
        feed = {"input_ids": ids, "token_type_ids": np.ones((batch, 1), np.int64),  # one causal token
                "image_features": np.zeros((batch, 0, self.manifest.hidden_size), self._features_dtype),
                "attention_mask": attention_mask, "cache_position": np.array([slot], np.int64)}
        return self.run_in_place(feed, cache)

    def _device_value(self, host: np.ndarray):
        """A copy of `host` in memory that ONNX Runtime allocates where the decoder runs. (Not an
        OrtValue wrapping `host`: `OrtValue.numpy()` of one of those returns a view that does not
        keep the memory alive, so an application holding only that view would read freed memory.)"""
        value = ort.OrtValue.ortvalue_from_shape_and_type(host.shape, host.dtype, *self._device)
        value.update_inplace(np.ascontiguousarray(host))
        return value

    def new_cache(self, batch: int, max_len: int, start: Sequence | None = None) -> list:
        """KV buffers for decoder.onnx: `2 * num_layers` OrtValues `[batch, kv_heads, max_len,
        head_dim]` where the decoder runs, zeroed, or holding `start` (a `past` as `prefill`
        returns it, `[batch, kv_heads, past, head_dim]` each) in their first slots. (Zeroed: slots
        not written yet are masked out of attention, but a weight of 0 times the NaN of
        uninitialised memory would still be NaN.)

        >>> cache = model.new_cache(1, 300)  # doctest: +SKIP
        """
        m = self.manifest
        buffers = []
        for i in range(len(self._past_names)):
            host = np.zeros((batch, m.num_kv_heads, max_len, m.head_dim), self._past_dtype)
            if start is not None:
                values = start[i].numpy() if isinstance(start[i], ort.OrtValue) else np.asarray(start[i])
                host[:, :, :values.shape[2]] = values
            buffers.append(self._device_value(host))
        return buffers

    def run_in_place(self, feed: dict[str, Any], cache: Sequence) -> np.ndarray:
        """Run decoder.onnx with `cache` (from `new_cache`) bound as both `past` and `present`:
        the new keys/values are written into it in place. Returns the logits `[B, vocab]` float32.

        `feed`: input_ids, image_features, attention_mask `[B, max_len]`, token_type_ids,
        cache_position (see exporters/graphs.py for their meaning).
        """
        binding = self.decoder_session.io_binding()
        for name, x in feed.items():
            self._bind_input(binding, name, self._value(x, self._features_dtype if name == "image_features" else np.int64))
        binding.bind_output("logits", "cpu")  # first: get_outputs() lists outputs in the order bound
        for past_name, present_name, buffer in zip(self._past_names, self._present_names, cache):
            binding.bind_ortvalue_input(past_name, buffer)
            binding.bind_ortvalue_output(present_name, buffer)
        self.decoder_session.run_with_iobinding(binding)
        logits = binding.get_outputs()[0].numpy()
        return logits if logits.dtype == np.float32 else logits.astype(np.float32)

    # ------------------------------------------------------------------ generation
    def stepper(self) -> _Stepper | _BufferStepper:
        """A fresh `pgexport.runtime.generation.Stepper` over this model (holds one call's KV cache:
        with decoder.onnx, buffers allocated once and written in place)."""
        return _BufferStepper(self) if self.single_decoder else _Stepper(self)

    def generate_ids(self, input_ids, attention_mask, pixel_values, max_new_tokens: int = 32,
                     sampling: Sampling | None = None) -> np.ndarray:
        """New token ids `[B, n]` for processor outputs (rows that hit eos are padded after it)."""
        m = self.manifest
        return generate_tokens(self.stepper(), np.asarray(input_ids, np.int64), np.asarray(attention_mask, np.int64),
                               np.asarray(pixel_values), max_new_tokens, m.eos_token_id, m.pad_token_id, sampling)

    def generate(self, images, prompts, max_new_tokens: int = 32, sampling: Sampling | None = None,
                 padding_side: str = "left") -> list[str]:
        """Text for each (image, prompt) pair (one image may serve all prompts); greedy by default."""
        batch = self.processor.generation_batch(images, prompts, max_new_tokens, self.manifest.max_position_embeddings,
                                                padding_side)
        ids = self.generate_ids(batch["input_ids"], batch["attention_mask"], batch["pixel_values"],
                                max_new_tokens, sampling)
        return self.processor.batch_decode(ids, skip_special_tokens=True)

    def generate_stream(self, image, prompt: str, max_new_tokens: int = 32,
                        sampling: Sampling | None = None) -> Iterator[str]:
        """The text for one image and prompt, in pieces as the tokens arrive; joined, the pieces
        are `generate`'s text. Stop iterating (or `close()` the iterator) to stop generating.

        >>> for piece in model.generate_stream(image, "caption en"):  # doctest: +SKIP
        ...     print(piece, end="", flush=True)
        """
        m = self.manifest
        batch = self.processor.generation_batch([image], [prompt], max_new_tokens, m.max_position_embeddings)
        steps = iter_tokens(self.stepper(), batch["input_ids"], batch["attention_mask"], batch["pixel_values"],
                            max_new_tokens, m.eos_token_id, m.pad_token_id, sampling)
        return stream_text(steps, self.processor.tokenizer, m.eos_token_id)


def _share_mode(share_weights: bool | str, provider: str) -> str | None:
    """share_weights -> how: "buffers" (CPU default), "initializers" (CUDA default), None (no sharing)."""
    if share_weights is False or share_weights is None:
        return None
    if share_weights is True:
        return "buffers" if provider == "cpu" else "initializers"
    if share_weights == "buffers" and provider != "cpu":
        raise PgExportError("share_weights='buffers' (memory-mapped data files) is for provider='cpu'; "
                            "use share_weights=True or 'initializers' on CUDA")
    if share_weights not in ("buffers", "initializers"):
        raise PgExportError(f"share_weights={share_weights!r}; use True, False, 'buffers' or 'initializers'")
    return share_weights


def _shape(x) -> tuple:
    """The shape of a numpy array or an OrtValue."""
    return tuple(x.shape() if callable(getattr(x, "shape", None)) else x.shape)


class _Stepper:
    """One generation call's state (KV cache and mask) over a shared `OnnxPaliGemma`."""

    def __init__(self, model: OnnxPaliGemma):
        self.model = model
        self.past: list | None = None
        self.mask: np.ndarray | None = None

    def prefill(self, input_ids, attention_mask, pixel_values, max_new_tokens: int) -> np.ndarray:
        features = self.model.encode_image(pixel_values, keep_on_device=True)
        self.mask = np.ascontiguousarray(attention_mask, dtype=np.int64)
        logits, self.past = self.model.prefill(input_ids, features, self.mask)
        return logits

    def decode(self, tokens: np.ndarray) -> np.ndarray:
        tokens = np.asarray(tokens, np.int64).reshape(-1, 1)
        self.mask = np.concatenate([self.mask, np.ones((len(tokens), 1), np.int64)], axis=1)
        logits, self.past = self.model.decode(tokens, self.mask, self.past)
        return logits


class _BufferStepper:
    """One generation call over decoder.onnx: the KV cache is allocated once, for the prompt plus
    `max_new_tokens`, and every step writes its slot in place."""

    def __init__(self, model: OnnxPaliGemma):
        self.model = model
        self.cache: list | None = None
        self.mask: np.ndarray | None = None  # [B, max_len]: 1 where a real token has been written
        self.next_slot = 0

    def prefill(self, input_ids, attention_mask, pixel_values, max_new_tokens: int) -> np.ndarray:
        m = self.model
        ids = np.ascontiguousarray(input_ids, dtype=np.int64)
        batch, seq = ids.shape
        features = m.encode_image(pixel_values, keep_on_device=True)
        self.mask = np.zeros((batch, seq + max_new_tokens), np.int64)
        self.mask[:, :seq] = attention_mask
        self.cache = m.new_cache(batch, seq + max_new_tokens)
        self.next_slot = seq
        feed = {"input_ids": ids, "image_features": features, "attention_mask": self.mask,
                "token_type_ids": np.zeros_like(ids), "cache_position": np.arange(seq, dtype=np.int64)}
        return m.run_in_place(feed, self.cache)

    def decode(self, tokens: np.ndarray) -> np.ndarray:
        slot = self.next_slot
        if slot >= self.mask.shape[1]:
            raise PgExportError(f"the KV cache holds {self.mask.shape[1]} tokens (prompt + max_new_tokens); "
                                "pass a larger max_new_tokens to prefill")
        self.mask[:, slot] = 1
        self.next_slot += 1
        return self.model.decode_in_place(tokens, self.mask, self.cache, slot)


def _has_input(path: Path, name: str) -> bool:
    """Whether the ONNX graph at `path` (read without its weights) has an input called `name`."""
    return any(i.name == name for i in load_graph_proto(path).graph.input)


def _load_named_tokenizer(path: Path):
    """A tokenizer file with a non-standard name (the manifest's `tokenizer` field)."""
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:
        raise PgExportError(f"cannot read the tokenizer {path}: {one_line(e)}; re-copy the export folder") from None
