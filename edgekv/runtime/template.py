"""Chat templates: messages -> the prompt text, through llama.cpp's own template engine.

`llama_chat_apply_template` knows a fixed set of templates: it recognises a model's Jinja template by
its markers, or takes one of its built-in names (`chatml`, `gemma`, `llama3`, ...; the list is
`builtin_templates()`), as llama.cpp's `--chat-template NAME` does. When a model has no template, or
llama.cpp does not recognise it, edgekv formats ChatML and says so once on stderr (and `edgekv info`
says it too): a base model such as the real Gemma 3 270M GGUF answers like itself only with
`--chat-template gemma`.

Several built-in templates normalise history (gemma and llama3 trim every message), so a conversation
rendered again need not start with the text already in the cache; `Session` handles that (it cuts the
cache back to where the texts agree, as llama.cpp's server does).
"""
from __future__ import annotations

import ctypes
import sys
from typing import Sequence

from edgekv.errors import EdgeKVError
from edgekv.runtime.lib import llama_cpp



def builtin_templates() -> list[str]:
    """The template names llama.cpp accepts in place of a Jinja template."""
    n = llama_cpp.llama_chat_builtin_templates(None, 0)
    arr = (ctypes.c_char_p * n)()
    llama_cpp.llama_chat_builtin_templates(arr, n)
    return sorted(a.decode() for a in arr)


def check_template_name(name: str) -> str:
    """`name` if llama.cpp has a built-in template of that name, else a clear error listing them."""
    names = builtin_templates()
    if name not in names:
        raise EdgeKVError(f"unknown chat template {name!r}; llama.cpp's built-in templates are: "
                          + ", ".join(names))
    return name


def apply(template: str | None, messages: Sequence[dict], add_assistant: bool) -> str | None:
    """The rendered prompt, or None when llama.cpp cannot use `template` (None: the model has none)."""
    if template is None:
        return None
    arr = (llama_cpp.llama_chat_message * len(messages))(
        *[llama_cpp.llama_chat_message(m["role"].encode(), m["content"].encode()) for m in messages])
    size = 4096 + 2 * sum(len(m["content"].encode()) for m in messages)
    buf = ctypes.create_string_buffer(size)
    n = llama_cpp.llama_chat_apply_template(template.encode(), arr, len(messages), add_assistant, buf, size)
    if n > size:
        buf = ctypes.create_string_buffer(n + 1)
        n = llama_cpp.llama_chat_apply_template(template.encode(), arr, len(messages), add_assistant, buf, n + 1)
    return buf.raw[:n].decode("utf-8", "replace") if n >= 0 else None


def chatml(messages: Sequence[dict], add_assistant: bool) -> str:
    out = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return out + ("<|im_start|>assistant\n" if add_assistant else "")


def fallback_reason(model_template: str | None) -> str | None:
    """Why the model's own template is not used (None: it is), for the warning and `edgekv info`."""
    if model_template is None:
        return "the model has no chat template"
    if apply(model_template, [{"role": "user", "content": "hi"}], True) is None:
        return "llama.cpp does not recognise the model's chat template"
    return None


def warn_fallback(reason: str) -> None:
    print(f"warning: {reason}; formatting prompts as ChatML (choose one with --chat-template NAME, "
          "e.g. gemma, llama3, chatml)", file=sys.stderr)
