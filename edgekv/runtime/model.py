"""Loading a GGUF text model (+ optional mmproj) into a llama.cpp context, with every check llama.cpp
would otherwise fail on made first, in Python, with a clear message."""
from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from edgekv.errors import EdgeKVError, ModelLoadError, SessionError
from edgekv.kv.codec import TYPE_IDS
from edgekv.kv.rotation import KVRotation
from edgekv.runtime import lib
from edgekv.runtime.layout import ModelLayout, read_layout
from edgekv.runtime.lifetime import Closable
from edgekv.runtime.lib import llama_cpp, mtmd_cpp
from edgekv.runtime.options import ModelOptions

FlashAttn = Literal["auto", "on", "off"]
CACHE_TYPES = ("f16", "bf16", "q8_0", "q4_0", "f32")
_FA = {"auto": -1, "off": 0, "on": 1}
N_SEQ_MAX = 2  # sequences per context: the conversation (0) and one media chunk being compacted (1)


def check_gguf(path: str | os.PathLike, what: str) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise ModelLoadError(f"{what} not found: {p}")
    if p.is_dir():
        raise ModelLoadError(f"{what} is a directory, not a GGUF file: {p}")
    try:
        with open(p, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise ModelLoadError(f"cannot read {what} {p}: {e.strerror}") from None
    if magic != b"GGUF":
        raise ModelLoadError(f"{what} is not a GGUF file (bad magic {magic!r}): {p}")
    return p


def mmproj_output_dim(path: Path) -> int | None:
    """The projector's output width (must equal the text model's n_embd), read from the GGUF header."""
    try:
        from gguf import GGUFReader

        reader = GGUFReader(str(path))
    except Exception as e:  # a GGUF the gguf package cannot parse is corrupt for llama.cpp too
        raise ModelLoadError(f"mmproj file is corrupt or unreadable: {path} ({e})") from None
    arch = reader.fields.get("general.architecture")
    if arch is not None and bytes(arch.parts[-1]).decode() != "clip":
        raise ModelLoadError(f"{path} is a '{bytes(arch.parts[-1]).decode()}' model, not an mmproj "
                             "(projector) file; pass the text model with -m and the projector with --mmproj")
    # llava tiling asserts (and aborts the process) when a grid pinpoint is not a multiple of the tile
    pins, size = reader.fields.get("clip.vision.image_grid_pinpoints"), reader.fields.get("clip.vision.image_size")
    if pins is not None and size is not None:
        tile = int(size.parts[-1][0])
        values = [int(pins.parts[i][0]) for i in pins.data]
        if tile <= 0 or any(v <= 0 or v % tile for v in values):
            raise ModelLoadError(f"mmproj {path.name}: image_grid_pinpoints {values} are not multiples of the "
                                 f"image size {tile}; llama.cpp would abort on this file")
    dims = {t.name: [int(x) for x in t.shape] for t in reader.tensors if t.name.startswith("mm.")}
    weights = sorted(n for n in dims if n.endswith(".weight"))
    if not weights:
        return None
    last = max(weights, key=lambda n: int(n.split(".")[1]) if n.split(".")[1].isdigit() else -1)
    return dims[last][-1] if len(dims[last]) > 1 else None


@dataclass(eq=False)
class Model(Closable):
    """A loaded text model, its llama.cpp context, and (optionally) the mtmd projector context."""

    closed_message = "the model was closed (Model.close()); load it again to continue"

    model: object
    ctx: object
    mtmd: object | None
    layout: ModelLayout
    path: Path
    mmproj_path: Path | None
    n_ctx: int
    n_batch: int
    threads: int
    flash_attn: FlashAttn
    cache_type_k: str
    cache_type_v: str
    capture: object | None = None
    rotation: KVRotation = field(default_factory=KVRotation)  # of the context's cache (kv/rotation.py)
    abort_flag: object | None = field(default=None, repr=False)  # 2-byte buffer, see abort_callback()
    template_name: str | None = None   # --chat-template: a llama.cpp built-in name instead of the model's
    _template_warned: bool = field(default=False, repr=False)
    identity: dict | None = field(default=None, repr=False)   # saved.model_identity's, computed once
    _closed: bool = field(default=False, repr=False)
    _session: object | None = field(default=None, repr=False)    # the one live Session

    @classmethod
    def load(cls, model_path: str | os.PathLike, mmproj_path: str | os.PathLike | None = None,
             options: ModelOptions | None = None, **changes) -> "Model":
        """Load model (+ mmproj) with `options` (runtime/options.py; keywords change single options, e.g.
        `Model.load(path, n_ctx=2048)`). Raises ModelLoadError with a clear message on any problem."""
        from edgekv.runtime import template
        from edgekv.runtime.capture import QueryCapture

        o = (options or ModelOptions()).with_(**changes)
        n_ctx, n_batch, n_gpu_layers, threads = o.n_ctx, o.n_batch, o.n_gpu_layers, o.threads
        flash_attn, cache_type_k, cache_type_v = o.flash_attn, o.cache_type_k, o.cache_type_v
        capture_queries, image_max_tokens, chat_template = o.capture_queries, o.image_max_tokens, o.chat_template

        path = check_gguf(model_path, "model")
        mm = check_gguf(mmproj_path, "mmproj") if mmproj_path else None
        for name, t in (("--cache-type-k", cache_type_k), ("--cache-type-v", cache_type_v)):
            if t not in CACHE_TYPES:
                raise ModelLoadError(f"{name} must be one of {', '.join(CACHE_TYPES)}, got {t!r}")
        if flash_attn not in _FA:
            raise ModelLoadError(f"flash attention must be on, off or auto, got {flash_attn!r}")
        if cache_type_v not in ("f16", "bf16", "f32") and flash_attn == "off":
            raise ModelLoadError(f"a quantized V cache ({cache_type_v}) needs flash attention: "
                                 "use --flash-attn on (or auto), or --cache-type-v f16")
        if n_ctx < 16 or n_batch < 1:
            raise ModelLoadError(f"context size must be >= 16 and batch >= 1 (got {n_ctx}, {n_batch})")
        threads = threads or max(1, min(os.cpu_count() or 1, 8))

        lib.init()
        if chat_template is not None:
            try:
                template.check_template_name(chat_template)
            except EdgeKVError as e:
                raise ModelLoadError(str(e)) from None
        mparams = llama_cpp.llama_model_default_params()
        mparams.n_gpu_layers = n_gpu_layers
        model = llama_cpp.llama_model_load_from_file(str(path).encode(), mparams)
        if not model:
            raise ModelLoadError(f"llama.cpp could not load the model {path} (corrupt or truncated GGUF, or an "
                                 f"architecture this llama.cpp does not know)", log=lib.recent_log())
        try:
            layout = read_layout(model)
            if llama_cpp.llama_model_is_recurrent(model) or llama_cpp.llama_model_is_hybrid(model):
                raise ModelLoadError(f"{layout.arch} keeps a recurrent state: edgekv compresses attention "
                                     "KV caches only")
            if mm is not None:
                out_dim = mmproj_output_dim(mm)
                if out_dim is not None and out_dim != layout.n_embd:
                    raise ModelLoadError(f"mmproj does not match the model: the projector outputs {out_dim}-dim "
                                         f"embeddings but {path.name} has n_embd {layout.n_embd}")
            if capture_queries and not lib.TENSOR_LAYOUT_OK:
                # QueryCapture reads the graph's tensors through a ctypes mirror of ggml_tensor: on another
                # ggml layout it would read (and copy) the wrong bytes
                raise ModelLoadError("this llama.cpp build's ggml_tensor layout differs from the one edgekv "
                                     "mirrors, so query capture (auto and the query-aware methods) is off: "
                                     "use a query-agnostic method (e.g. --method keydiff; see `edgekv methods`)")
            capture = QueryCapture(layout) if capture_queries else None
            abort_flag = ctypes.create_string_buffer(2)
            rotation = _rotation_for(layout, cache_type_k, cache_type_v, capture)
            ctx = _new_context(model, n_ctx, n_batch, threads, flash_attn, cache_type_k, cache_type_v, capture,
                               abort_flag)
        except BaseException:
            llama_cpp.llama_model_free(model)
            raise
        self = cls(model=model, ctx=ctx, mtmd=None, layout=layout, path=path, mmproj_path=mm,
                   n_ctx=_cells(ctx, n_ctx), n_batch=n_batch, threads=threads, flash_attn=flash_attn,
                   cache_type_k=cache_type_k, cache_type_v=cache_type_v, capture=capture,
                   rotation=rotation, abort_flag=abort_flag, template_name=chat_template)
        if mm is not None:
            try:
                self.mtmd = _init_mtmd(mm, model, threads, n_gpu_layers > 0, image_max_tokens)
            except BaseException:
                self.close()
                raise
        return self

    def resize_context(self, n_ctx: int) -> None:
        """Recreate the llama.cpp context with `n_ctx` cells; the cache starts empty, so do it before a
        Session uses the model. Lets a caller size the context once the projector has said what the media
        costs (video: budget + one chunk + text). The old context is freed first, so the peak memory is
        the larger of the two, not their sum."""
        self.check_open()
        if self._session is not None:
            raise SessionError("resize_context() needs the model without a live Session: close() it first")
        if n_ctx < 16:
            raise ModelLoadError(f"context size must be >= 16 (got {n_ctx})")
        llama_cpp.llama_free(self.ctx)
        self.ctx = None
        self.rotation = _rotation_for(self.layout, self.cache_type_k, self.cache_type_v, self.capture)
        self.ctx = _new_context(self.model, n_ctx, self.n_batch, self.threads, self.flash_attn,
                                self.cache_type_k, self.cache_type_v, self.capture, self.abort_flag)
        self.n_ctx = _cells(self.ctx, n_ctx)

    @property
    def vocab(self):
        return llama_cpp.llama_model_get_vocab(self.model)

    @property
    def n_vocab(self) -> int:
        return self.layout.n_vocab

    @property
    def cell_bytes(self) -> int:
        """K+V bytes one cell costs in the compressible block with this context's cache types."""
        return self.layout.bytes_per_cell(self.cache_type_k, self.cache_type_v)

    def tokenize(self, text: str, add_bos: bool = False, special: bool = True) -> list[int]:
        data = text.encode("utf-8")
        n_max = len(data) + 16
        buf = (llama_cpp.llama_token * n_max)()
        n = llama_cpp.llama_tokenize(self.vocab, data, len(data), buf, n_max, add_bos, special)
        if n < 0:
            buf = (llama_cpp.llama_token * -n)()
            n = llama_cpp.llama_tokenize(self.vocab, data, len(data), buf, -n, add_bos, special)
        return list(buf[:n])

    def token_bytes(self, token: int, special: bool = False) -> bytes:
        buf = ctypes.create_string_buffer(64)
        n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        return buf.raw[:n]

    def detokenize(self, tokens: list[int], special: bool = False) -> str:
        return b"".join(self.token_bytes(t, special) for t in tokens).decode("utf-8", errors="replace")

    def is_eog(self, token: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(self.vocab, token))

    @property
    def bos(self) -> int:
        return int(llama_cpp.llama_vocab_bos(self.vocab))

    @property
    def add_bos(self) -> bool:
        return bool(llama_cpp.llama_vocab_get_add_bos(self.vocab))

    def chat_template(self) -> str | None:
        """The template the chat uses: --chat-template's name, else the model's own (None: it has none)."""
        if self.template_name is not None:
            return self.template_name
        t = llama_cpp.llama_model_chat_template(self.model, None)
        return t.decode("utf-8", "replace") if t else None

    def template_warning(self) -> str | None:
        """Why prompts fall back to ChatML, the first time it is asked (to say it once), else None."""
        if self._template_warned:
            return None
        self._template_warned = True
        return self.template_fallback() or "no usable chat template"

    def template_fallback(self) -> str | None:
        """Why prompts are formatted as ChatML instead of the model's template (None: they are not)."""
        from edgekv.runtime.template import fallback_reason

        return fallback_reason(self.chat_template())

    def attach(self, session: object) -> None:
        """Make `session` the model's one live session. llama.cpp holds one sequence per context here
        (n_seq_max = 1), so a second session would silently clear and overwrite the first one's cache."""
        self.check_open()
        if self._session is not None and self._session is not session:
            raise SessionError("this model already has a live Session: close() it first (one conversation "
                               "per loaded model; load the model twice for two at once)")
        self._session = session

    def detach(self, session: object) -> None:
        if self._session is session:
            self._session = None

    def set_abort(self, on: bool) -> None:
        """Raise or lower the flag llama.cpp's abort callback reads between graph nodes."""
        if self.abort_flag is not None:
            self.abort_flag[0] = b"\x01" if on else b"\x00"

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.mtmd:
            mtmd_cpp.mtmd_free(self.mtmd)
        if self.ctx:
            llama_cpp.llama_free(self.ctx)
        if self.model:
            llama_cpp.llama_model_free(self.model)


def _rotation_for(layout: ModelLayout, cache_type_k: str, cache_type_v: str, capture) -> KVRotation:
    """The rotation of a context about to be created (right before it: llama.cpp reads the environment
    then), handed to the query capture so that captured queries meet the cached keys as attention does."""
    rotation = layout.kv_rotation(cache_type_k, cache_type_v)
    if capture is not None:
        capture.rotation = rotation
    return rotation


def _cells(ctx, asked: int) -> int:
    """The cells edgekv lets the cache hold: what was asked for. llama.cpp pads the context up to a multiple
    of 256 (600 -> 768); every check (room for a prompt, early compaction, the answer's length, a clip's
    budget) reads Model.n_ctx, so the cache stays within the asked size (--max-kv-cells N: at most N)."""
    return min(asked, llama_cpp.llama_n_ctx(ctx))


def _new_context(model, n_ctx: int, n_batch: int, threads: int, flash_attn: FlashAttn, cache_type_k: str,
                 cache_type_v: str, capture, abort_flag):
    cparams = llama_cpp.llama_context_default_params()
    cparams.n_ctx = n_ctx
    cparams.n_batch = n_batch
    cparams.n_ubatch = n_batch  # non-causal image chunks must fit one ubatch
    # Two sequences in one unified cell pool: seq 1 marks one media chunk so compaction reads and
    # rewrites that chunk alone (the LastChunk region of runtime/compactor.py), not a host copy of the whole cache.
    cparams.n_seq_max = N_SEQ_MAX
    # llama.cpp reserves room for at least n_seq_max outputs and asserts that this is within
    # n_outputs_max (n_batch by default): -b 1 would abort the process without this.
    cparams.n_outputs_max = max(n_batch, N_SEQ_MAX)
    cparams.kv_unified = True
    cparams.n_threads = threads
    cparams.n_threads_batch = threads
    cparams.flash_attn_type = _FA[flash_attn]
    cparams.type_k = TYPE_IDS[cache_type_k]
    cparams.type_v = TYPE_IDS[cache_type_v]
    cparams.no_perf = True
    cparams.abort_callback = abort_callback()
    cparams.abort_callback_data = ctypes.cast(abort_flag, ctypes.c_void_p)
    if capture is not None:
        cparams.cb_eval = capture.callback
        cparams.cb_eval_user_data = None
    ctx = llama_cpp.llama_init_from_model(model, cparams)
    if not ctx:
        raise ModelLoadError(f"llama.cpp could not create a context (n_ctx={n_ctx}, "
                             f"K {cache_type_k}, V {cache_type_v}, flash attention {flash_attn})",
                             log=lib.recent_log())
    return ctx


_ABORT_CALLBACK = None


def abort_callback():
    """llama.cpp's abort callback as C's own `strlen` on a 2-byte flag buffer: it returns 1 (abort) once
    the first byte is set and 0 otherwise, without the GIL. A Python callback would run for every graph
    node (hundreds per decode) and wait for the GIL whenever another Python thread is busy."""
    global _ABORT_CALLBACK
    if _ABORT_CALLBACK is None:
        import sys

        libc = ctypes.cdll.msvcrt if sys.platform == "win32" else ctypes.CDLL(None)
        _ABORT_CALLBACK = llama_cpp.ggml_abort_callback(ctypes.cast(libc.strlen, ctypes.c_void_p).value)
    return _ABORT_CALLBACK


def _init_mtmd(mmproj: Path, model, threads: int, use_gpu: bool, image_max_tokens: int | None):
    params = mtmd_cpp.mtmd_context_params_default()
    params.use_gpu = use_gpu
    params.n_threads = threads
    params.print_timings = False
    if image_max_tokens is not None and hasattr(params, "image_max_tokens"):
        params.image_max_tokens = image_max_tokens
    ctx = mtmd_cpp.mtmd_init_from_file(str(mmproj).encode(), model, params)
    if not ctx:
        raise ModelLoadError(f"could not load the mmproj {mmproj} (does it belong to this model?)",
                             log=lib.recent_log())
    if not mtmd_cpp.mtmd_support_vision(ctx):
        mtmd_cpp.mtmd_free(ctx)
        raise ModelLoadError(f"{mmproj} has no vision encoder (audio-only projectors are not supported)")
    return ctx
