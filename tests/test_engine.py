"""The continuous-batching engine (pgexport.engine): every request gets exactly the tokens that
`OnnxPaliGemma.generate` gives it alone, whatever joins or leaves the batch around it.

The reference is the runtime's own solo generation (batch 1, a KV cache of the request's own
length), which tests/test_onnx_export.py and tests/test_sliding_window.py tie to eager PyTorch
and transformers.
"""

from __future__ import annotations

import random
import time

import numpy as np
import pytest

pytest.importorskip("torch")

from pgexport.bundled import SAMPLE_IMAGE  # noqa: E402
from pgexport.engine import Engine, PromptTooLong, QueueFull  # noqa: E402
from pgexport.engine.stops import StopText  # noqa: E402
from pgexport.errors import PgExportError  # noqa: E402
from pgexport.exporters.pipeline import export_folder  # noqa: E402
from pgexport.runtime.generation import Sampling  # noqa: E402
from pgexport.runtime.session import OnnxPaliGemma  # noqa: E402

PROMPTS = ["caption en", "detect circle", "answer en how many shapes are there in this picture?",
           "answer en what color is the big square on the left?", "detect triangle ; square", "ocr"]
NEW_TOKENS = [1, 2, 5, 9, 16]


@pytest.fixture(scope="module")
def exports(checkpoints, tmp_path_factory):
    """Factory: (variant, quant) -> an export of that test checkpoint, made once."""
    made = {}

    def get(variant: str, quant: str = "fp32") -> OnnxPaliGemma:
        """quant: fp32, fp16, int4, or int8-FORMAT (int8-nbits, int8-rowwise, int8-dynamic)."""
        if (variant, quant) not in made:
            out = tmp_path_factory.mktemp(f"engine-{variant}-{quant}") / "export"
            bits, _, int8_format = quant.partition("-")
            export_folder(checkpoints(variant).load(), out, quant=bits, validate=False, progress=None,
                          quant_options={"int8_format": int8_format} if int8_format else None)
            made[variant, quant] = OnnxPaliGemma(out, threads=1)
        return made[variant, quant]

    return get


def image(model: OnnxPaliGemma, seed: int) -> np.ndarray:
    size = model.manifest.image_size
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def solo(model: OnnxPaliGemma, ids: np.ndarray, pixels: np.ndarray, max_new_tokens: int,
         sampling: Sampling | None) -> list[int]:
    """What `generate` gives this request alone (eos and what follows dropped)."""
    out = model.generate_ids(ids[None], np.ones((1, len(ids)), np.int64), pixels[None], max_new_tokens, sampling)[0]
    eos = model.manifest.eos_token_id
    out = out.tolist()
    return out[:out.index(eos)] if eos in out else out


def requests(model: OnnxPaliGemma, count: int, seed: int):
    """`count` (input_ids, pixel_values, max_new_tokens, sampling) with mixed prompts and lengths;
    every third is sampled with a seed of its own."""
    rng = random.Random(seed)
    out = []
    for i in range(count):
        batch = model.processor(images=[image(model, i % 7)], prompts=[rng.choice(PROMPTS)])
        sampling = Sampling(do_sample=True, temperature=0.8, top_p=0.95, seed=i) if i % 3 == 0 else None
        out.append((batch["input_ids"][0], batch["pixel_values"][0], rng.choice(NEW_TOKENS), sampling))
    return out


# pg2 / pg2-kv1-win5: sliding windows of 16 and 5 tokens, shorter than every prompt (16 image
# tokens + text) and than the rows the engine holds.
@pytest.mark.parametrize("variant", ["pg1", "pg2", "pg2-kv1-win5"])
def test_forty_requests_at_random_times_equal_their_solo_generation(exports, variant):
    model = exports(variant)
    work = requests(model, 40, seed=7)
    longest = max(len(ids) for ids, *_ in work)
    # Room for exactly one longest request: the rows run out of slots and move left
    # (compaction), and short prompts join behind long ones. The first 16 arrive at once, so the
    # rows stay busy for more steps than max_len has free slots (a compaction whatever the
    # machine's speed); the rest at seeded random times.
    engine = Engine(model, max_batch=4, max_len=longest + max(NEW_TOKENS), max_new_tokens=max(NEW_TOKENS))
    arrivals = random.Random(3)
    handles = []
    try:
        for i, (ids, pixels, n, sampling) in enumerate(work):
            handles.append(engine.submit_ids(ids, pixels, n, sampling))
            if i >= 16:
                time.sleep(arrivals.random() * 0.01)
        results = [h.result(timeout=120) for h in handles]
    finally:
        engine.close()
    for (ids, pixels, n, sampling), result in zip(work, results):
        assert result.finish_reason in ("stop", "length")
        assert result.token_ids == solo(model, ids, pixels, n, sampling)
        assert result.text == model.processor.decode(result.token_ids)
    assert engine.stats.compactions > 0  # the test covered rows moving inside the buffer
    assert engine.stats.decode_rows > engine.stats.steps  # and rows decoded together
    assert engine.running == 0 and engine.rows.active == 0


@pytest.mark.parametrize("quant", ["fp16", "int4", "int8-nbits", "int8-rowwise"])
def test_quantized_exports_are_exact_per_request(exports, quant):
    """fp16, int4, the weight-only int8 (MatMulNBits) and the rowwise int8 (activations quantized
    per row) do not mix rows: batched = alone."""
    model = exports("pg1", quant)
    work = requests(model, 12, seed=11)
    with Engine(model, max_batch=4, max_new_tokens=max(NEW_TOKENS)) as engine:
        handles = [engine.submit_ids(ids, pixels, n, sampling) for ids, pixels, n, sampling in work]
        results = [h.result(timeout=120) for h in handles]
    for (ids, pixels, n, sampling), result in zip(work, results):
        assert result.token_ids == solo(model, ids, pixels, n, sampling)


def test_a_cancelled_request_frees_its_row_for_the_next_at_the_next_step(exports):
    model = exports("pg1")
    (ids, pixels, _, _), = requests(model, 1, seed=5)
    engine = Engine(model, max_batch=2, max_new_tokens=60)
    try:
        # Stop strings no answer of this random model contains keep eos out of it: force length.
        long_a = engine.submit_ids(ids, pixels, 60)
        long_b = engine.submit_ids(ids, pixels, 60)
        waiting = engine.submit_ids(ids, pixels, 4)
        # A and B may be admitted at different steps (the loop can wake between the submits):
        # wait for a token of each, so both rows are taken before looking at the queue.
        first_a = next(iter(long_a.stream(timeout=60)))
        first_b = next(iter(long_b.stream(timeout=60)))
        assert first_a.token_id is not None and first_b.token_id is not None
        assert waiting.timing.admitted is None and engine.waiting == 1
        cancelled_at = time.perf_counter()
        long_a.cancel()
        assert long_a.result(timeout=60).finish_reason == "cancelled"
        assert waiting.result(timeout=60).finish_reason in ("stop", "length")
        b_done = long_b.result(timeout=60)
    finally:
        engine.close()
    if b_done.finish_reason == "length":  # B still held its row the whole time
        # At most the step in flight when cancel() came ran before the waiting request got A's row.
        steps_between = [t for t in long_b.timing.token_times if cancelled_at < t < waiting.timing.admitted]
        assert len(steps_between) <= 1
    assert waiting.timing.admitted < long_b.timing.finished
    assert engine.rows.active == 0


def test_stop_strings_cut_the_answer_and_free_the_row(exports):
    model = exports("pg1")
    work = requests(model, 6, seed=13)
    with Engine(model, max_batch=3, max_new_tokens=16) as engine:
        for ids, pixels, _, _ in work:
            full = model.processor.decode(solo(model, ids, pixels, 16, None))
            if len(full) < 6:
                continue
            stop = full[3:5]
            result = engine.submit_ids(ids, pixels, 16, stop=["\x00never", stop]).result(timeout=60)
            assert result.text == full[:full.index(stop)] and result.finish_reason == "stop"
            pieces = "".join(c.text for c in engine.submit_ids(ids, pixels, 16, stop=[stop]).stream(timeout=60))
            assert pieces == full[:full.index(stop)]
        assert engine.running == 0


def test_stop_text_holds_back_what_may_start_a_stop_string():
    stops = StopText(["END", "\n\n"])
    assert stops.feed("a E") == ("a ", False)
    assert stops.feed("N") == ("", False)
    assert stops.feed("D tail") == ("", True)
    assert stops.text == "a "
    free = StopText(["END"])
    assert free.feed("a EN") == ("a ", False) and free.feed("X") == ("ENX", False) and free.finish() == ""


def test_refusals_are_one_line(exports):
    model = exports("pg1")
    (ids, pixels, _, _), = requests(model, 1, seed=1)
    with Engine(model, max_batch=1, max_len=len(ids) + 200, max_new_tokens=200, max_queue=1) as engine:
        with pytest.raises(PromptTooLong, match="over the engine's max_len"):
            engine.submit_ids(np.concatenate([ids, ids[-5:]]), pixels, 197)
        with pytest.raises(PgExportError, match="takes 1 to 200"):
            engine.submit_ids(ids, pixels, 201)
        busy = engine.submit_ids(ids, pixels, 200, ignore_eos=True)  # holds the only row for 200 steps
        next(iter(busy.stream(timeout=60)))  # admitted: it has its first token
        queued = engine.submit_ids(ids, pixels, 4)
        assert engine.waiting == 1
        with pytest.raises(QueueFull, match="max_queue=1"):
            engine.submit_ids(ids, pixels, 4)
        busy.cancel()
        assert busy.result(timeout=60).finish_reason == "cancelled"
        assert queued.result(timeout=60).finish_reason in ("stop", "length")


def test_folders_without_the_single_decoder_fall_back_to_static_batches(exports):
    model = exports("pg1")
    split = OnnxPaliGemma(model.export_dir, threads=1, single_decoder=False)
    work = requests(split, 8, seed=17)
    with pytest.warns(UserWarning, match="static batches"):
        engine = Engine(split, max_batch=3, max_new_tokens=max(NEW_TOKENS))
    with engine:
        handles = [engine.submit_ids(ids, pixels, n, sampling) for ids, pixels, n, sampling in work]
        handles[1].cancel()
        results = [h.result(timeout=120) for h in handles]
    for i, ((ids, pixels, n, sampling), result) in enumerate(zip(work, results)):
        if result.finish_reason != "cancelled":
            assert result.token_ids == solo(split, ids, pixels, n, sampling)
    assert engine.note.startswith("continuous batching needs decoder.onnx")


def test_async_streams_read_the_same_chunks(exports):
    import asyncio

    model = exports("pg1")
    work = requests(model, 4, seed=19)

    async def main(engine):
        handles = [engine.submit_ids(ids, pixels, n, sampling) for ids, pixels, n, sampling in work]

        async def collect(h):
            return [c async for c in h.astream()], await h.aresult()

        return await asyncio.gather(*(collect(h) for h in handles))

    with Engine(model, max_batch=2, max_new_tokens=max(NEW_TOKENS)) as engine:
        got = asyncio.run(main(engine))
    for (chunks, result), (ids, pixels, n, sampling) in zip(got, work):
        assert [c.token_id for c in chunks if c.token_id is not None] == result.token_ids
        assert "".join(c.text for c in chunks) == result.text
        assert result.token_ids == solo(model, ids, pixels, n, sampling)


def test_ignore_eos_generates_max_new_tokens(demo_export):
    """The demo model ends its caption with eos; with ignore_eos the row goes on to max_new_tokens,
    its first tokens those of the answer alone, eos included."""
    model = OnnxPaliGemma(demo_export, threads=1)
    batch = model.processor(images=[SAMPLE_IMAGE], prompts=["caption en"])
    ids, pixels = batch["input_ids"][0], batch["pixel_values"][0]
    alone = solo(model, ids, pixels, 40, None)
    assert len(alone) < 39
    with Engine(model, max_batch=2, max_new_tokens=40) as engine:
        normal = engine.submit_ids(ids, pixels, 40)
        endless = engine.submit_ids(ids, pixels, 40, ignore_eos=True)
        results = normal.result(timeout=60), endless.result(timeout=60)
    assert results[0].token_ids == alone and results[0].finish_reason == "stop"
    assert results[1].finish_reason == "length" and len(results[1].token_ids) == 40
    assert results[1].token_ids[:len(alone) + 1] == alone + [model.manifest.eos_token_id]
