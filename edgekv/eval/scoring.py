"""Scores: retrieval hit, and KL / top-1 agreement of teacher-forced logits against the full cache."""
from __future__ import annotations

import re

import numpy as np


def normalize(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def retrieval_hit(generated: str, answer: str) -> bool:
    """True when the greedy continuation contains the answer as a whole token (digits/hex run):
    '71432' matches ' 71432.' but not '714321'."""
    if not answer:
        raise ValueError("empty answer")
    return re.search(rf"(?<![0-9A-Za-z]){re.escape(answer)}(?![0-9A-Za-z])", generated) is not None


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = np.asarray(logits, dtype=np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def kl_divergence(ref_logits: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """[N] KL(P_ref || P) in nats per position, P = softmax of each row."""
    lp, lq = log_softmax(ref_logits), log_softmax(logits)
    return np.maximum((np.exp(lp) * (lp - lq)).sum(axis=-1), 0.0)


def top1_agreement(ref_logits: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """[N] bool: the argmax token is the same."""
    return np.argmax(ref_logits, axis=-1) == np.argmax(logits, axis=-1)


def target_nll(logits: np.ndarray, target: np.ndarray) -> np.ndarray:
    """[N] negative log-likelihood of the real next tokens. logits[i] predicts target[i]."""
    lp = log_softmax(logits)
    return -lp[np.arange(len(target)), np.asarray(target)]


class Reference:
    """The full cache's teacher-forced logits, with their log-probabilities computed once per sample."""

    def __init__(self, logits: np.ndarray):
        self.logits = np.asarray(logits)
        self.logp = log_softmax(self.logits)
        self.p = np.exp(self.logp)
        self.argmax = np.argmax(self.logits, axis=-1)


def continuation_scores(ref: "np.ndarray | Reference", logits: np.ndarray, target) -> dict:
    """Per-sample continuation metrics. `score` is the top-1 agreement (1.0 for the full cache).
    kl: mean over positions of KL(P_full || P_compressed) in nats; nll: of the real next tokens."""
    ref = ref if isinstance(ref, Reference) else Reference(ref)
    lq = log_softmax(logits)
    kl = np.maximum((ref.p * (ref.logp - lq)).sum(axis=-1), 0.0)
    agree = ref.argmax == np.argmax(logits, axis=-1)
    nll = -lq[np.arange(len(target)), np.asarray(target)]
    return {
        "score": float(agree.mean()),
        "kl": float(kl.mean()),
        "kl_max": float(kl.max()),
        "top1": float(agree.mean()),
        "nll": float(nll.mean()),
        "target_acc": float((np.argmax(logits, axis=-1) == np.asarray(target)).mean()),
    }
