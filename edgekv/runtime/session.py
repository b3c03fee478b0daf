"""The session: a conversation in one llama.cpp sequence whose media cells get compacted.

Data flow: text and media -> mtmd chunks -> prefill (own batches for text, mtmd for images) -> the
sequence's state blob -> KVView -> method.plan -> packer -> set_data -> decode.

We drive llama.cpp's low-level API ourselves (not `llama_cpp.Llama`): after compaction the cell count is
not the position count, so we track logical positions (`n_past`, from chunks' n_pos for M-RoPE) and the
kind of every cell (protected text, media waiting for compaction, packed slots) in blob order.
"""
from __future__ import annotations

import codecs
import ctypes
import resource
import sys
import time
from dataclasses import dataclass, field
from typing import Iterator, Literal

import numpy as np

from edgekv.errors import BudgetError, CompactionError, ContextOverflowError, EdgeKVError, MediaError, StateFormatError
from edgekv.kv.codec import SeqState, parse_state, serialize_state
from edgekv.kv.packer import layer_floats, pack_block
from edgekv.methods import KVView, Method, Span, get_method, parse_budget, resolve_budget
from edgekv.methods.parallel import planning_threads
from edgekv.runtime import lib
from edgekv.runtime.lib import llama_cpp, mtmd_cpp
from edgekv.runtime.media import ImageInput, load_image
from edgekv.runtime.model import Model

PROTECTED, PENDING, PACKED = 0, 1, 2
CHATML = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"


@dataclass
class CompactionReport:
    method: str
    budget_cells: int          # cells per (layer, head) the user's budget asked for
    n_candidates: int          # compressible cells before
    cells_before: int
    cells_after: int
    bytes_before: int          # K+V bytes of the whole sequence (all cache blocks)
    bytes_after: int
    seconds: float             # read + plan + pack + write back
    plan_seconds: float
    nominal_mean: float
    nominal_max: int
    merged: bool
    window: int                # captured query rows used (0 = query-agnostic)
    info: dict = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        return self.bytes_after / self.bytes_before if self.bytes_before else 1.0


@dataclass
class GenerationResponse:
    """One streamed step (mlx-lm style): the new text plus running speed and memory figures."""

    text: str
    token: int
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory_mb: float
    finish_reason: str | None = None


@dataclass(frozen=True)
class SessionSnapshot:
    """Everything a Session needs to return to an earlier point: the cache bytes and the bookkeeping."""

    blob: bytes
    kind: np.ndarray
    media: np.ndarray
    n_past: int
    n_media: int
    window_q: np.ndarray | None
    window_rows: int
    logits: np.ndarray | None
    messages: tuple
    in_cache_text: str


def peak_rss_mb() -> float:
    """Peak resident set size of this process (ru_maxrss is KiB on Linux, bytes on macOS)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / (1024 * 1024) if sys.platform == "darwin" else r / 1024


class Session:
    """One conversation on a loaded `Model`.

    method:   a registered method name (`auto` picks by regime) or a Method instance.
    budget:   ratio (0, 1] of the compressible cells, or an absolute cell count.
    compress: "media" compresses image/frame spans (and spans appended with compressible=True);
              "all" compresses every prompt token except the first and the observation window.
    window:   observation-window length W (the last W prompt tokens, whose queries are captured).
    early_compact: when the next media chunk would not fit the context, compact the media already
              prefilled first (query-agnostic: the question has not arrived). This is what lets a context
              sized for the budget hold a many-tile image or many frames (design.md section 4).
    probe:    the probe window used when compaction must happen with no captured question window
              (runtime/probe.py): the question text when it is known in advance, True for a generic
              probe, False for none (query-agnostic methods then, as before).
    """

    probe: str | bool = True

    def __init__(self, model: Model, *, method: str | Method = "auto", budget: float | int | str = 0.25,
                 compress: Literal["media", "all"] = "media", window: int = 32, seed: int = 0,
                 auto_compact: bool = True, early_compact: bool = True,
                 method_kwargs: dict | None = None, probe: str | bool = True) -> None:
        if compress not in ("media", "all"):
            raise EdgeKVError(f"compress must be 'media' or 'all', got {compress!r}")
        self.model = model
        self.method_name = method if isinstance(method, str) else method.name
        self.method = get_method(method, **(method_kwargs or {})) if isinstance(method, str) else method
        self.budget = parse_budget(budget)
        if isinstance(self.budget, int) and self.budget > model.n_ctx:
            raise BudgetError(f"budget of {self.budget} cells is larger than the context ({model.n_ctx} cells)")
        self.compress = compress
        self.window = int(window)
        self.seed = seed
        self.auto_compact = auto_compact
        self.early_compact = early_compact
        self.probe = probe
        self._batch = llama_cpp.llama_batch_init(model.n_batch, 0, 1)
        self.reports: list[CompactionReport] = []
        self.prompt_tokens = 0
        self.prompt_seconds = 0.0
        self.clear()

    # --- state ----------------------------------------------------------------------------------
    def clear(self) -> None:
        """Forget the conversation and empty the cache."""
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self.model.ctx), True)
        self.n_past = 0
        self.kind = np.zeros(0, np.int8)        # per cell, blob order: PROTECTED / PENDING / PACKED
        self.media = np.zeros(0, np.int32)      # per cell: media index or -1
        self.n_media = 0
        self._window_q: np.ndarray | None = None
        self._window_rows = 0
        self._logits: np.ndarray | None = None
        self.messages: list[dict] = []
        self._in_cache_text = ""

    @property
    def n_cells(self) -> int:
        return int(self.kind.shape[0])

    @property
    def logits(self) -> np.ndarray:
        if self._logits is None:
            raise EdgeKVError("no logits yet: append a prompt first")
        return self._logits

    def state_blob(self) -> bytes:
        ctx = self.model.ctx
        n = llama_cpp.llama_state_seq_get_size(ctx, 0)
        buf = (ctypes.c_uint8 * n)()
        got = llama_cpp.llama_state_seq_get_data(ctx, buf, n, 0)
        if got != n:
            raise StateFormatError(f"llama.cpp returned {got} of {n} state bytes")
        return bytes(buf)

    def _parse(self, blob: bytes) -> SeqState:
        lay = self.model.layout
        state = parse_state(blob, has_ext=lay.mrope, n_blocks=2 if lay.iswa else 1)
        base = state.blocks[0]
        if base.n_cells:
            want = len(lay.global_layers)
            if base.n_layers != want:
                raise StateFormatError(f"the cache holds {base.n_layers} layers where {lay.arch} should have "
                                       f"{want}: unsupported model layout")
            for layer in base.layers:
                if layer.n_embd_k != lay.n_head_kv * lay.head_dim or layer.n_embd_v != lay.n_head_kv * lay.head_dim_v:
                    raise StateFormatError(f"per-layer KV widths differ from {lay.n_head_kv} heads x "
                                           f"{lay.head_dim}: unsupported model layout")
        return state

    def kv_bytes(self) -> int:
        """K+V bytes the sequence holds in all cache blocks."""
        return self._parse(self.state_blob()).nbytes if self.n_cells else 0

    def snapshot(self) -> SessionSnapshot:
        """The cache and bookkeeping as they are now (e.g. to try several methods on one prefill)."""
        return SessionSnapshot(self.state_blob(), self.kind.copy(), self.media.copy(), self.n_past, self.n_media,
                               self._window_q, self._window_rows, self._logits,
                               tuple(dict(m) for m in self.messages), self._in_cache_text)

    def restore(self, snap: SessionSnapshot) -> None:
        """Put the cache and bookkeeping back as `snapshot()` saw them."""
        if not self._set_state(snap.blob):
            raise CompactionError(f"llama.cpp refused the saved state:\n{lib.recent_log()}")
        self.kind, self.media = snap.kind.copy(), snap.media.copy()
        self.n_past, self.n_media = snap.n_past, snap.n_media
        self._window_q, self._window_rows, self._logits = snap.window_q, snap.window_rows, snap.logits
        self.messages, self._in_cache_text = [dict(m) for m in snap.messages], snap.in_cache_text

    def _set_state(self, blob: bytes) -> bool:
        buf = (ctypes.c_uint8 * len(blob)).from_buffer_copy(blob)
        return llama_cpp.llama_state_seq_set_data(self.model.ctx, buf, len(blob), 0) == len(blob)

    # --- prefill --------------------------------------------------------------------------------
    def _check_room(self, n: int) -> None:
        if self.n_cells + n > self.model.n_ctx:
            raise ContextOverflowError(
                f"the prompt needs {n} more cells but only {self.model.n_ctx - self.n_cells} of "
                f"{self.model.n_ctx} are free; raise -c/--ctx-size or lower the image size or budget")

    def _make_room(self, n: int) -> None:
        """Compact pending media early if `n` more cells would not fit, then check again."""
        if self.n_cells + n > self.model.n_ctx and self.early_compact and (self.kind == PENDING).any():
            meth = self.method
            if meth.needs_queries and not self.probe:  # (auto resolves to its query-agnostic pick itself)
                meth = get_method("auto")  # no question yet: the query-agnostic pick
            self.compact(method=meth, early=True)
        self._check_room(n)

    def _decode(self, tokens: list[int], logits: Literal["last", "all", "none"], capture_rows: int = 0) -> np.ndarray | None:
        b = self._batch
        n = len(tokens)
        for i, tok in enumerate(tokens):
            b.token[i] = tok
            b.pos[i] = self.n_past + i
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = 0
            b.logits[i] = logits == "all" or (logits == "last" and i == n - 1)
        b.n_tokens = n
        cap = self.model.capture
        if capture_rows and cap is not None:
            cap.arm(capture_rows)
        try:
            rc = llama_cpp.llama_decode(self.model.ctx, b)
        finally:
            if cap is not None:
                cap.disarm()
        if rc != 0:
            if rc == 1:
                raise ContextOverflowError("llama.cpp found no free KV slot for the batch (context full)")
            raise EdgeKVError(f"llama_decode failed with code {rc}:\n{lib.recent_log()}")
        self.n_past += n
        if logits == "none":
            return None
        V = self.model.n_vocab
        rows = range(n) if logits == "all" else [n - 1]
        out = np.stack([np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self.model.ctx, i), (V,)).copy()
                        for i in rows])
        self._logits = out[-1]
        return out

    def _add_cells(self, n: int, kind: int, media: int = -1) -> None:
        self.kind = np.concatenate([self.kind, np.full(n, kind, np.int8)])
        self.media = np.concatenate([self.media, np.full(n, media, np.int32)])

    def append_tokens(self, tokens: list[int], *, compressible: bool = False, logits_all: bool = False,
                      capture: bool = True) -> np.ndarray | None:
        """Prefill tokens. The last `window` of them are decoded alone with query capture armed (they
        are the observation window if compaction follows). Returns logits for every token if logits_all."""
        tokens = list(tokens)
        if not tokens:
            return None
        self._make_room(len(tokens))
        t0 = time.perf_counter()
        w = min(self.window, len(tokens)) if (capture and self.model.capture is not None) else 0
        body, tail = tokens[: len(tokens) - w], tokens[len(tokens) - w:]
        outs = []
        step = self.model.n_batch
        self._window_q, self._window_rows = None, 0
        kind = PENDING if compressible else PROTECTED
        for i in range(0, len(body), step):
            chunk = body[i:i + step]
            last = not tail and i + step >= len(body)
            outs.append(self._decode(chunk, "all" if logits_all else ("last" if last else "none")))
            self._add_cells(len(chunk), kind)
        if tail:
            outs.append(self._decode(tail, "all" if logits_all else "last", capture_rows=w))
            self._add_cells(len(tail), kind)
            if w:
                self._window_q = self.model.capture.window(self._query_layers())
                self._window_rows = w if self._window_q is not None else 0
        self.prompt_tokens += len(tokens)
        self.prompt_seconds += time.perf_counter() - t0
        return np.concatenate([o for o in outs if o is not None]) if logits_all else None

    def append_text(self, text: str, *, compressible: bool = False, special: bool = True) -> None:
        add_bos = self.n_past == 0 and self.model.add_bos
        self.append_tokens(self.model.tokenize(text, add_bos=add_bos, special=special), compressible=compressible)

    def eval_logits(self, tokens: list[int]) -> np.ndarray:
        """Teacher forcing: append tokens (protected) and return [n, n_vocab] logits, row i predicting
        token i+1. The first row predicts after tokens[0]; use `logits` before calling for tokens[0]."""
        return self.append_tokens(tokens, logits_all=True, capture=False)

    def append_prompt(self, text: str, images: list[ImageInput] = ()) -> None:
        """Text with one media marker per image (mtmd_default_marker()), tokenized and prefilled by mtmd.
        Image chunks become compressible spans; text chunks stay protected."""
        images = list(images)
        if not images:
            return self.append_text(text)
        if self.model.mtmd is None:
            raise MediaError("this model was loaded without an mmproj (--mmproj): it cannot read images")
        decoded = [load_image(im) for im in images]
        mctx = self.model.mtmd
        bitmaps = []
        chunks = mtmd_cpp.mtmd_input_chunks_init()
        try:
            for im in decoded:
                data = (ctypes.c_uint8 * len(im.data)).from_buffer_copy(im.data)
                bm = mtmd_cpp.mtmd_bitmap_init(im.width, im.height, data)
                if not bm:
                    raise MediaError(f"mtmd could not take image {im.name}")
                bitmaps.append(bm)
            raw = text.encode("utf-8")
            inp = mtmd_cpp.mtmd_input_text(raw, len(raw), self.n_past == 0, True)
            arr = (mtmd_cpp.mtmd_bitmap_p_ctypes * len(bitmaps))(*bitmaps)
            rc = mtmd_cpp.mtmd_tokenize(mctx, chunks, ctypes.byref(inp), arr, len(bitmaps))
            if rc == 1:
                raise MediaError(f"{len(images)} image(s) but the prompt has a different number of media markers")
            if rc != 0:
                raise MediaError(f"the projector could not preprocess the image(s) (code {rc}):\n{lib.recent_log()}")
            if not self.early_compact:
                self._check_room(int(mtmd_cpp.mtmd_helper_get_n_tokens(chunks)))
            n = mtmd_cpp.mtmd_input_chunks_size(chunks)
            for i in range(n):
                chunk = mtmd_cpp.mtmd_input_chunks_get(chunks, i)
                if mtmd_cpp.mtmd_input_chunk_get_type(chunk) == 0:   # MTMD_INPUT_CHUNK_TYPE_TEXT
                    n_tok = ctypes.c_size_t()
                    ptr = mtmd_cpp.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(n_tok))
                    self.append_tokens([ptr[j] for j in range(n_tok.value)])
                else:
                    self._eval_media_chunk(chunk)
        finally:
            mtmd_cpp.mtmd_input_chunks_free(chunks)
            for bm in bitmaps:
                mtmd_cpp.mtmd_bitmap_free(bm)

    def _eval_media_chunk(self, chunk) -> None:
        n_tok = int(mtmd_cpp.mtmd_input_chunk_get_n_tokens(chunk))
        self._make_room(n_tok)
        t0 = time.perf_counter()
        new_past = llama_cpp.llama_pos(0)
        rc = mtmd_cpp.mtmd_helper_eval_chunk_single(self.model.mtmd, self.model.ctx, chunk, self.n_past, 0,
                                                    self.model.n_batch, False, ctypes.byref(new_past))
        if rc != 0:
            raise MediaError(f"evaluating an image chunk failed (code {rc}):\n{lib.recent_log()}")
        self.n_past = int(new_past.value)
        self._add_cells(n_tok, PENDING, self.n_media)
        self.n_media += 1
        self._window_q, self._window_rows = None, 0
        self.prompt_tokens += n_tok
        self.prompt_seconds += time.perf_counter() - t0

    # --- compaction -----------------------------------------------------------------------------
    def _query_layers(self) -> list[int]:
        return self.model.layout.global_layers

    def candidates(self) -> np.ndarray:
        """[cells] bool: what the next compaction may evict."""
        cand = self.kind == PENDING
        if self.compress == "all":
            cand = self.kind != PACKED
            cand[:1] = False
        if self._window_rows:
            cand[self.n_cells - self._window_rows:] = False
        if self.n_cells:
            cand[-1] = False  # the pos_max cell must survive, or the next decode is refused
        return cand

    def compact(self, method: str | Method | None = None, budget: float | int | str | None = None,
                early: bool = False, probe: str | bool | None = None) -> CompactionReport | None:
        """Compress the compressible cells appended since the last compaction. On any failure the
        original cache is restored and CompactionError raised. Returns None when there is nothing to do.
        Without a captured question window, query-aware methods and `auto` use a probe window
        (`probe`: the question if known, True generic, False none; default `self.probe`)."""
        cand = self.candidates()
        if not cand.any():
            return None
        meth = self.method if method is None else (get_method(method) if isinstance(method, str) else method)
        probe = self.probe if probe is None else probe
        if not self._window_rows and probe is not False:
            from edgekv.runtime import probe as probes

            if probes.wants_probe(meth):
                r = probes.compact_with_probe(self, meth, budget, early, probe)
                if r is not probes.SKIPPED:
                    return r
                if early and meth.needs_queries:  # no room or no capture for a probe
                    meth = get_method("auto")
        budget_cells = resolve_budget(self.budget if budget is None else budget, int(cand.sum()))
        t0 = time.perf_counter()
        blob = self.state_blob()
        state = self._parse(blob)
        base = state.blocks[0]
        if base.n_cells != self.n_cells:
            raise StateFormatError(f"the cache holds {base.n_cells} cells where the session tracked {self.n_cells}")
        lay = self.model.layout
        K, V = layer_floats(base, lay.n_head_kv)
        view = KVView(keys=K, values=V, candidates=cand, spans=self._spans(), queries=self._window_q,
                      scale=lay.attn_scale, positions=base.pos.astype(np.int64), seed=self.seed,
                      rope_base=lay.rope_base, rope_neox=lay.rope_neox)
        label = meth.name
        if getattr(meth, "resolve", None):
            meth = meth.resolve(view)  # `auto`: picks by regime (query window or not)
            label = f"auto -> {meth.name}"
        if early:
            label += " (early, before the question)"
        if meth.needs_queries and view.queries is None:
            raise EdgeKVError(f"method {meth.name!r} needs the question's queries, but none were captured "
                              "(flash attention capture off, or no text after the media): use "
                              "--method flashcache or --method auto")
        t1 = time.perf_counter()
        with planning_threads(self.model.threads):
            plan = (meth.plan(view, budget_cells) if budget_cells < view.n_candidates or meth.name == "full"
                    else None)
        plan_s = time.perf_counter() - t1
        if plan is None:  # budget covers everything: keep the cells as they are
            self.kind[cand] = PACKED
            return self._report(label, budget_cells, cand, state, state, t0, plan_s, None, view)
        merged = None
        if plan.merge_to is not None:
            from edgekv.methods.merge import merged_kv

            merged = merged_kv(K, V, plan)
        new_base, src = pack_block(base, plan, cand, lay.n_head_kv, merged)
        new_state = SeqState(state.seq_id, [new_base] + state.blocks[1:], state.has_ext)
        new_blob = serialize_state(new_state)
        if not self._set_state(new_blob):
            restored = self._set_state(blob)
            raise CompactionError("llama.cpp refused the compacted cache"
                                  + ("; the original cache was restored" if restored
                                     else " AND the original could not be restored: call clear()")
                                  + f":\n{lib.recent_log()}")
        # Bookkeeping follows the packer's cell order: protected cells in place, slots marked PACKED.
        self.kind = np.where(cand[src], PACKED, self.kind[src]).astype(np.int8)
        self.media = self.media[src]
        return self._report(label, budget_cells, cand, state, new_state, t0, plan_s, plan, view)

    def _report(self, name, budget_cells, cand, before: SeqState, after: SeqState, t0, plan_s, plan, view):
        r = CompactionReport(
            method=name, budget_cells=budget_cells, n_candidates=int(cand.sum()),
            cells_before=before.blocks[0].n_cells, cells_after=after.blocks[0].n_cells,
            bytes_before=before.nbytes, bytes_after=after.nbytes, seconds=time.perf_counter() - t0,
            plan_seconds=plan_s,
            nominal_mean=float(plan.nominal.mean()) if plan is not None else float(budget_cells),
            nominal_max=int(plan.nominal.max()) if plan is not None else budget_cells,
            merged=plan is not None and plan.merge_to is not None,
            window=0 if view.queries is None else view.window,
            info=dict(plan.info) if plan is not None else {})
        self.reports.append(r)
        return r

    def _spans(self) -> tuple[Span, ...]:
        spans, start = [], 0
        key = np.where(self.kind == PACKED, -2, self.media)
        for i in range(1, self.n_cells + 1):
            if i == self.n_cells or key[i] != key[start]:
                m = int(self.media[start])
                spans.append(Span(start, i, "media" if m >= 0 else "text", m))
                start = i
        return tuple(spans)

    # --- chat & generation ----------------------------------------------------------------------
    def format_chat(self, messages: list[dict], add_assistant: bool = True) -> str:
        tmpl = self.model.chat_template()
        if tmpl is not None:
            arr = (llama_cpp.llama_chat_message * len(messages))(
                *[llama_cpp.llama_chat_message(m["role"].encode(), m["content"].encode()) for m in messages])
            size = 4096 + 2 * sum(len(m["content"]) for m in messages)
            buf = ctypes.create_string_buffer(size)
            n = llama_cpp.llama_chat_apply_template(tmpl.encode(), arr, len(messages), add_assistant, buf, size)
            if n > size:
                buf = ctypes.create_string_buffer(n + 1)
                n = llama_cpp.llama_chat_apply_template(tmpl.encode(), arr, len(messages), add_assistant, buf, n + 1)
            if n >= 0:
                return buf.raw[:n].decode("utf-8", "replace")
        # ChatML fallback (llama.cpp could not read the model's template, or it has none)
        out = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        return out + ("<|im_start|>assistant\n" if add_assistant else "")

    def chat(self, prompt: str, images: list[ImageInput] = (), **gen) -> Iterator[GenerationResponse]:
        """One user turn: images + prompt through the chat template, compaction, streamed answer.
        Later turns reuse the (compacted) cache: only the new part of the conversation is prefilled."""
        images = list(images)
        marker = mtmd_cpp.mtmd_default_marker().decode()
        content = "".join(f"{marker}\n" for _ in images) + prompt
        self.messages.append({"role": "user", "content": content})
        full = self.format_chat(self.messages, add_assistant=True)
        common = _common_prefix(full, self._in_cache_text)
        self.append_prompt(full[common:], images)
        self._in_cache_text = full
        if self.auto_compact:
            self.compact()
        answer = []
        for r in self.generate(**gen):
            answer.append(r.text)
            yield r
        text = "".join(answer)
        self.messages.append({"role": "assistant", "content": text})
        self._in_cache_text += text

    def sample(self, logits: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator) -> int:
        if temperature <= 0:
            return int(np.argmax(logits))
        z = (logits.astype(np.float64) - logits.max()) / temperature
        p = np.exp(z)
        p /= p.sum()
        if top_p < 1.0:
            order = np.argsort(-p, kind="stable")
            cum = np.cumsum(p[order])
            cut = order[: int(np.searchsorted(cum, top_p)) + 1]
            q = np.zeros_like(p)
            q[cut] = p[cut]
            p = q / q.sum()
        return int(rng.choice(len(p), p=p))

    def generate(self, max_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int | None = None, stop: tuple[str, ...] = ()) -> Iterator[GenerationResponse]:
        """Stream tokens after the current prompt. The last response carries finish_reason
        ('stop', 'length' or 'context')."""
        rng = np.random.default_rng(self.seed if seed is None else seed)
        dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
        prompt_tps = self.prompt_tokens / self.prompt_seconds if self.prompt_seconds else 0.0
        t0, n, text = time.perf_counter(), 0, ""
        finish = "length"
        tok = -1
        for _ in range(max_tokens):
            tok = self.sample(self.logits, temperature, top_p, rng)
            if self.model.is_eog(tok):
                finish = "stop"
                break
            if self.n_cells + 1 > self.model.n_ctx:
                finish = "context"
                break
            self.append_tokens([tok], capture=False)
            n += 1
            piece = dec.decode(self.model.token_bytes(tok))
            text += piece
            hit = next((s for s in stop if s in text), None)
            dt = time.perf_counter() - t0
            if hit is not None:
                yield GenerationResponse(piece, tok, self.prompt_tokens, prompt_tps, n, n / dt, peak_rss_mb(), "stop")
                return
            yield GenerationResponse(piece, tok, self.prompt_tokens, prompt_tps, n, n / dt, peak_rss_mb())
        dt = time.perf_counter() - t0
        yield GenerationResponse(dec.decode(b"", final=True), tok, self.prompt_tokens, prompt_tps, n,
                                 n / dt if dt else 0.0, peak_rss_mb(), finish)

    def close(self) -> None:
        if self._batch is not None:
            llama_cpp.llama_batch_free(self._batch)
            self._batch = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
