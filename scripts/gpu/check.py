"""CUDA checks for edgekv on a GPU machine: the same image prompt on the CPU and with every layer
offloaded (prefill logits, greedy tokens after compaction), and the state blob round trip and compaction
on the GPU. Prints PASS/FAIL/INFO lines; see scripts/gpu/README.md."""
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, os.getcwd())
from edgekv.testing.tiny import VARIANTS, build_pair, make_test_image
from edgekv.runtime import Model, Session
from edgekv.kv.codec import parse_state, serialize_state

NGLS = (0, int(os.environ.get("NGL_TEST", "99")))  # NGL_TEST=0: a dry run on the CPU
out = Path(tempfile.mkdtemp())
ok_all = True

def check(name, cond, detail=""):
    global ok_all
    ok_all &= bool(cond)
    print(f"{'PASS' if cond else 'FAIL'} {name} {detail}", flush=True)

for variant in ("llava-tiles", "qwen2vl"):
    model, mmproj = build_pair(variant, out, seed=0)
    w, h = VARIANTS[variant]["test_image"]
    img = out / f"{variant}.png"
    img.write_bytes(make_test_image(w, h, seed=1))
    for fa, ctk, ctv in (("off", "f16", "f16"), ("on", "f16", "f16"), ("on", "q8_0", "q8_0")):
        res = {}
        for ngl in NGLS:
            m = Model.load(model, mmproj, n_ctx=4096, n_batch=2048, threads=8, flash_attn=fa, n_gpu_layers=ngl,
                           cache_type_k=ctk, cache_type_v=ctv)
            s = Session(m, method="snapkv", budget=0.25, auto_compact=False)
            t0 = time.perf_counter()
            s.append_prompt(f"{'<__media__>'}\nDescribe the picture in detail please.", [img])
            t_prefill = time.perf_counter() - t0
            logits_full = s.logits.copy()
            blob = s.state_blob()
            st = parse_state(blob, has_ext=m.layout.mrope)
            rt = serialize_state(st) == blob
            r = s.compact()
            after = parse_state(s.state_blob(), has_ext=m.layout.mrope).blocks[0].n_cells
            toks = [x.token for x in s.generate(max_tokens=8)]
            res[ngl] = dict(logits=logits_full, rt=rt, r=r, after=after, toks=toks, t=t_prefill,
                            keep=None)
            s.close(); m.close()
        g, c = res[NGLS[-1]], res[0]
        tag = f"{variant} fa={fa} {ctk}/{ctv}"
        check(f"{tag}: state blob round trip byte-exact on GPU", g["rt"])
        check(f"{tag}: compaction re-read cells", g["after"] == g["r"].cells_after,
              f"({g['r'].cells_before} -> {g['r'].cells_after}, {100*g['r'].ratio:.0f}% bytes, {1e3*g['r'].seconds:.1f} ms)")
        d = np.abs(g["logits"] - c["logits"]).max()
        top = int(np.argmax(g["logits"])) == int(np.argmax(c["logits"]))
        check(f"{tag}: CPU vs GPU prefill logits", top, f"(max |diff| {d:.4f}, top-1 same {top})")
        same = sum(a == b for a, b in zip(g["toks"], c["toks"]))
        print(f"INFO {tag}: greedy tokens after compaction agree CPU/GPU {same}/{len(g['toks'])}; "
              f"prefill s CPU {c['t']:.3f} GPU {g['t']:.3f}", flush=True)
print("ALL PASS" if ok_all else "SOME FAILED")
