"""How close an export's logits are to a reference's: top-1 agreement, KL divergence, cosine.

Used to validate exports (`pgexport.exporters.validate`), to gate quantization and by the
benchmarks; numpy only, so an ONNX Runtime app can check its own exports the same way.

    >>> import numpy as np
    >>> ref = [np.array([[2.0, 0.0, -1.0]])]
    >>> logit_quality(ref, ref)["top1_agreement"], logit_quality(ref, ref)["mean_kl"]
    (1.0, 0.0)
"""

from __future__ import annotations

import numpy as np


def logit_quality(ref: list[np.ndarray], got: list[np.ndarray], active: list[np.ndarray] | None = None) -> dict:
    """Agreement of two lists of per-step logits `[B, V]` (teacher forced), over active rows."""
    r = np.concatenate([x[a] for x, a in zip(ref, active)] if active else ref).astype(np.float64)
    g = np.concatenate([x[a] for x, a in zip(got, active)] if active else got).astype(np.float64)
    if not len(r):
        return {"positions": 0, "top1_agreement": 1.0, "mean_kl": 0.0, "max_kl": 0.0, "mean_cosine": 1.0,
                "min_cosine": 1.0}
    lp = r - r.max(-1, keepdims=True)
    lp -= np.log(np.exp(lp).sum(-1, keepdims=True))
    lq = g - g.max(-1, keepdims=True)
    lq -= np.log(np.exp(lq).sum(-1, keepdims=True))
    kl = (np.exp(lp) * (lp - lq)).sum(-1)
    cos = (r * g).sum(-1) / np.maximum(np.linalg.norm(r, axis=-1) * np.linalg.norm(g, axis=-1), 1e-30)
    return {"positions": int(len(r)), "top1_agreement": float((r.argmax(-1) == g.argmax(-1)).mean()),
            "mean_kl": float(kl.mean()), "max_kl": float(kl.max()), "mean_cosine": float(cos.mean()),
            "min_cosine": float(cos.min())}
