"""`edgekv eval`: fidelity, memory and decode-speed measurements (extra: `pip install edgekv[eval]`).

corpus   real text shipped offline (Python docs and stdlib source, license texts)
tasks    passkey / key-value retrieval and teacher-forced continuation samples
scoring  retrieval hits, KL and top-1 agreement against the full cache
gemma    the evaluation model (Gemma 3 270M, assembled from its PyPI package)
engine   prefill once, compact copies of the cache (on edgekv.runtime)
runner   the method x budget grid, one JSONL record per run, resumable
report   CSV / JSON / markdown; plots: matplotlib figures
memory   peak RSS of full vs budget-sized runs (subprocesses)
decode   decode ms/token full vs compacted, next to the memory-bandwidth bound
"""
